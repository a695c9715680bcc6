"""Weight sync on real parts: a trainer client, the coordinator's rendezvous and the session's two real CPU vLLM
engines, grouped over loopback with gloo (and the checkpoint method on the same engines).

Every check compares what the engines *serve* (logprobs of fixed prompts) with a Hugging Face forward pass of the
weights the trainer pushed. The module puts the original weights back when it ends, for the tests that follow.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import torch
import yaml

from explorer import credentials, engine_metrics, local_engine, membership, sink
from explorer import explorer as explorer_mod
from explorer.weight_sync import formation_store, protocol, versions
from explorer.weight_sync.rendezvous import SyncCoordinator
from explorer.weight_sync.trainer import SyncRefusedError, TrainerClient
from explorer.workflows import Task
from kubeplane import paths
from tests.auth import job_headers, trainer_headers
from tests.conftest import free_port
from tests.runtime import sync_support as support
from tests.waiting import wait_for

pytestmark = pytest.mark.vllm
TOLERANCE = 2e-5  # fp32 on CPU; the old weights are off by several nats


@pytest.fixture(scope="module")
def loop() -> Iterator[support.LoopThread]:
    thread = support.LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def coordinator(
    loop: support.LoopThread, cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SyncCoordinator]:  # fmt: skip
    cfg = support.sync_config([e.base_url for e in cpu_engines], tiny_model_dir, tmp_path_factory.mktemp("sync"),
                              free_port())  # fmt: skip
    coordinator = support.start_coordinator(loop, cfg)
    try:
        yield coordinator
    finally:
        try:
            with TrainerClient(address(coordinator)) as trainer:
                trainer.push(support.original_state(tiny_model_dir))
        finally:
            loop.run(coordinator.stop())


def address(coordinator: SyncCoordinator) -> str:
    return f"{coordinator.advertised_host}:{coordinator.api_port}"


def served_errors(
    engines: list[local_engine.LocalEngine], model_dir: Path, state: dict[str, torch.Tensor]
) -> list[float]:
    return [support.max_logprob_error(support.engine_logprobs(e.base_url), model_dir, state) for e in engines]


def test_push_reaches_every_engine_and_matches_hf(
    coordinator: SyncCoordinator, loop: support.LoopThread, cpu_engines: list[local_engine.LocalEngine],
    tiny_model_dir: Path,
) -> None:  # fmt: skip
    new = support.perturbed_state(tiny_model_dir, seed=1)
    assert min(served_errors(cpu_engines, tiny_model_dir, new)) > 0.1, "the perturbed weights must be distinguishable"
    with TrainerClient(address(coordinator)) as trainer:
        info = trainer.setup(new)
        assert info.world_size == 3 and info.method == "gloo"
        first = trainer.push(new)
        assert first.engines_in_sync == first.engines == 2
        assert first.bytes == sum(t.numel() * 4 for t in new.values())
        assert max(served_errors(cpu_engines, tiny_model_dir, new)) < TOLERANCE
        for engine in range(2):
            for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"):
                served = loop.run(coordinator.get_weight(name, engine=engine))
                assert torch.equal(served, new[name]), f"engine {engine} serves another {name}"

        newer = support.perturbed_state(tiny_model_dir, seed=2)
        second = trainer.push(newer)
        assert second.version == first.version + 1
        assert max(served_errors(cpu_engines, tiny_model_dir, newer)) < TOLERANCE
    state = coordinator.state()
    assert state.version == second.version and state.engines_in_sync == 2 and state.last_error is None
    assert coordinator.last_sync_bytes == second.bytes and coordinator.last_sync_time


def test_bad_metadata_is_refused_naming_the_tensor_and_nothing_changes(
    coordinator: SyncCoordinator, cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path
) -> None:
    good = support.perturbed_state(tiny_model_dir, seed=5)
    with TrainerClient(address(coordinator)) as trainer:
        trainer.push(good)
        version = coordinator.version
        wrong_shape = {**good, "model.norm.weight": torch.ones(10)}
        with pytest.raises(SyncRefusedError, match=r"'model\.norm\.weight' has shape \[10\].*\[64\]") as refused:
            trainer.push(wrong_shape)
        assert refused.value.status == 422
        unknown = {**good, "model.layers.9.mlp.up_proj.weight": torch.ones(4)}
        with pytest.raises(SyncRefusedError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight' is not a weight"):
            trainer.push(unknown)
        partial = {k: v for k, v in good.items() if k != "lm_head.weight"}
        with pytest.raises(SyncRefusedError, match="missing"):
            trainer.push(partial)
    assert coordinator.version == version
    assert max(served_errors(cpu_engines, tiny_model_dir, good)) < TOLERANCE


def test_trainer_killed_mid_push_leaves_the_previous_version_served(
    coordinator: SyncCoordinator, cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path
) -> None:
    previous = support.perturbed_state(tiny_model_dir, seed=3)
    with TrainerClient(address(coordinator)) as trainer:
        trainer.push(previous)
    version = coordinator.version
    before = [support.engine_logprobs(e.base_url) for e in cpu_engines]

    trainer_cmd = [sys.executable, "-m", "tests.runtime.sync_trainer_for_tests", address(coordinator),
                   str(tiny_model_dir), "4"]  # fmt: skip
    dying = subprocess.run([*trainer_cmd, "--die-after-chunks", "3"], cwd=paths.repo_root(), capture_output=True,
                           text=True, timeout=120, check=False)  # fmt: skip
    assert dying.returncode == -9, dying.stderr[-2000:]
    assert "dying after 3 chunks" in dying.stdout
    wait_for(lambda: coordinator.last_error, timeout=60, what="the coordinator to see the failed push")
    assert "receive failed" in (coordinator.last_error or "")
    assert coordinator.version == version
    after = [support.engine_logprobs(e.base_url) for e in cpu_engines]
    assert after == before, "an engine serves something other than the previous complete version"

    # The next trainer forms a new group and its push lands everywhere.
    recovered = subprocess.run(trainer_cmd, cwd=paths.repo_root(), capture_output=True, text=True, timeout=120,
                               check=False)  # fmt: skip
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert coordinator.version == (version or 0) + 1
    assert max(served_errors(cpu_engines, tiny_model_dir, support.perturbed_state(tiny_model_dir, 4))) < TOLERANCE


def test_fixed_style_explorer_waits_for_each_push_and_stamps_versions(
    coordinator: SyncCoordinator, loop: support.LoopThread, ray_cluster: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = coordinator.config.model_copy(deep=True)
    cfg.explore = cfg.explore.model_copy(update={"batch_size": 2, "repeat_times": 2, "total_steps": 3})
    cfg.workflow = cfg.workflow.model_copy(update={"max_tokens": 4})
    cfg.scheduler = cfg.scheduler.model_copy(update={"runners_per_engine": 1, "task_timeout_seconds": 60})
    cfg.experiences = cfg.experiences.model_copy(update={"path": str(tmp_path / "out")})
    cfg.sync = cfg.sync.model_copy(update={"style": "fixed", "interval": 1})
    explorer = explorer_mod.Explorer(cfg, sync=coordinator)
    coordinator.config = cfg
    out = sink.ExperienceSink(tmp_path / "out")
    start = coordinator.version
    run = asyncio.run_coroutine_threadsafe(explorer.explore(), loop.loop)
    pushed = []
    with TrainerClient(address(coordinator)) as trainer:
        for step in (1, 2):
            wait_for(lambda step=step: step in out.committed_steps(), timeout=180, what=f"step {step} committed")
            time.sleep(1.0)
            assert out.committed_steps() == set(range(1, step + 1)), "explored past a boundary without a push"
            assert "waiting for the trainer" in explorer.report.message
            pushed.append(trainer.push(support.perturbed_state(tiny_model_dir, seed=10 + step)).version)
    run.result(timeout=180)  # no wait after the last step: nothing is left to explore on newer weights
    assert coordinator.version == pushed[1]
    stamped = {step: {(e.policy_version, tuple(e.policy_versions)) for e in out.read_step(step)} for step in (1, 2, 3)}
    assert stamped[1] == {(start, (start,) if start is not None else ())}
    assert stamped[2] == {(pushed[0], (pushed[0],))}
    assert stamped[3] == {(pushed[1], (pushed[1],))}
    assert out.manifest()["steps"]["3"]["policyVersion"] == pushed[1]


class RotationProbe:
    """An explorer over the session's engines, observed as the coordinator's publish loop observes them."""

    def __init__(self, coordinator: SyncCoordinator, loop: support.LoopThread,
                 engines: list[local_engine.LocalEngine]):  # fmt: skip
        self.cfg = coordinator.config.model_copy(deep=True)
        self.cfg.workflow = self.cfg.workflow.model_copy(update={"max_tokens": 4})
        self.cfg.scheduler = self.cfg.scheduler.model_copy(update={"runners_per_engine": 2, "task_timeout_seconds": 60})
        self.explorer = explorer_mod.Explorer(self.cfg, sync=coordinator)
        self.loop, self.engines = loop, engines
        self.sched = loop.run(self.explorer._start_scheduler())
        self.experiences: list[Any] = []

    def observe(self) -> list[bool | None]:
        async def probe() -> list[Any]:
            async with httpx.AsyncClient(timeout=10, headers=job_headers()) as http:
                mark = self.explorer.version_mark()
                return self.explorer.observe_engines(await explorer_mod.probe_engines(self.cfg, http), mark)

        return [e.in_rotation for e in self.loop.run(probe())]

    def served_per_engine(self, batch_id: int) -> list[float]:
        before = [engine_metrics.fetch_requests_served(e.base_url) for e in self.engines]
        self.sched.schedule([Task(i, f"What is {i} plus 1?", str(i + 1)) for i in range(8)], batch_id=batch_id)
        statuses, self.experiences = self.loop.run(self.sched.get_results(batch_id, timeout=180))
        assert len(statuses) == 8 and all(s.ok for s in statuses), statuses
        return [engine_metrics.fetch_requests_served(e.base_url) - b for e, b in zip(self.engines, before, strict=True)]

    def stop(self) -> None:
        self.loop.run(self.sched.stop())


@pytest.mark.timeout(900)
def test_restarted_engine_leaves_the_rotation_and_rejoins_at_the_next_push(
    coordinator: SyncCoordinator, loop: support.LoopThread, ray_cluster: None,
    cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A restarted engine serves the base weights: the explorer stops dispatching to it (its tokens would be
    off-policy, labelled with the job's version) until it is at the job's version again; with catch-up off, that is
    the trainer's next push."""
    monkeypatch.setattr(coordinator.config, "sync", coordinator.config.sync.model_copy(update={"catch_up": False}))
    rotation = RotationProbe(coordinator, loop, cpu_engines)
    observe, served_per_engine, sched = rotation.observe, rotation.served_per_engine, rotation.sched
    try:
        with TrainerClient(address(coordinator)) as trainer:
            trainer.push(support.perturbed_state(tiny_model_dir, seed=6))
            assert observe() == [True, True]
            restarted = cpu_engines[1]
            restarted.stop()
            restarted.start()  # same port, original weights from disk, no group membership
            assert support.max_logprob_error(support.engine_logprobs(restarted.base_url), tiny_model_dir,
                                             support.original_state(tiny_model_dir)) < TOLERANCE  # fmt: skip
            assert observe() == [True, False]
            served = served_per_engine(1)
            assert served[1] == 0 and served[0] >= 8, f"requests per engine {served}: the stale engine served"
            newest = support.perturbed_state(tiny_model_dir, seed=7)
            result = trainer.push(newest)  # re-forms the group (the restarted engine is not a member), then pushes
            assert result.engines_in_sync == 2
            assert sched.engine_load is not None and sched.engine_load.serving == [True, True]
            assert observe() == [True, True]
            assert min(served_per_engine(2)) > 0, "back in the rotation"
    finally:
        rotation.stop()
    assert max(served_errors(cpu_engines, tiny_model_dir, newest)) < TOLERANCE


@pytest.mark.timeout(900)
def test_a_restarted_engine_catches_up_from_its_peer_before_it_serves_again(
    coordinator: SyncCoordinator, loop: support.LoopThread, ray_cluster: None,
    cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path,
) -> None:  # fmt: skip
    """No trainer push needed: as soon as a probe sees the restarted engine on its base weights, the coordinator has
    the peer engine send the weights it serves (a gloo group of the two, formed over the store with a one-time
    token); the engine rejoins the rotation at the job's version, and the trainer's next push re-forms its group."""
    rotation = RotationProbe(coordinator, loop, cpu_engines)
    pushed = support.perturbed_state(tiny_model_dir, seed=11)
    try:
        with TrainerClient(address(coordinator)) as trainer:
            version = trainer.push(pushed).version
            pushes, catch_ups = coordinator.syncs, coordinator.catch_ups
            restarted = cpu_engines[1]
            restarted.stop()
            restarted.start()  # same port, original weights from disk, no group membership
            assert rotation.observe() == [True, False], "off the rotation at once; its catch-up starts"
            wait_for(lambda: rotation.observe() == [True, True], timeout=180, what="engine 1 caught up from engine 0")
            assert coordinator.syncs == pushes and coordinator.catch_ups == catch_ups + 1, "no push: a catch-up"
            assert coordinator.engine_versions == [str(version)] * 2
            assert max(served_errors(cpu_engines, tiny_model_dir, pushed)) < TOLERANCE, "both serve the push"
            assert min(rotation.served_per_engine(1)) > 0, "back in the rotation"
            by_engine = {exp.info["engine"]: exp.info["engine_version"] for exp in rotation.experiences}
            assert by_engine == {0: str(version), 1: str(version)}, "its experiences carry the version it serves"
            newest = support.perturbed_state(tiny_model_dir, seed=12)
            result = trainer.push(newest)  # the caught-up engine left the trainer's group: re-formed, then pushed
            assert result.engines_in_sync == 2 and result.version > version
    finally:
        rotation.stop()
    assert max(served_errors(cpu_engines, tiny_model_dir, newest)) < TOLERANCE


def test_checkpoint_method_serves_the_same_model_as_gloo(
    coordinator: SyncCoordinator, loop: support.LoopThread, cpu_engines: list[local_engine.LocalEngine],
    tiny_model_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    weights = support.perturbed_state(tiny_model_dir, seed=8)
    with TrainerClient(address(coordinator)) as trainer:
        trainer.push(weights)
    by_gloo = [support.engine_logprobs(e.base_url) for e in cpu_engines]
    with TrainerClient(address(coordinator)) as trainer:
        trainer.push(support.perturbed_state(tiny_model_dir, seed=9))  # something else in between

    cfg = coordinator.config.model_copy(deep=True)
    cfg.sync = cfg.sync.model_copy(update={"method": "checkpoint", "checkpoint_path": str(tmp_path / "shared"),
                                           "port": free_port()})  # fmt: skip
    by_checkpoint_coordinator = support.start_coordinator(loop, cfg)
    try:
        with TrainerClient(address(by_checkpoint_coordinator)) as trainer:
            result = trainer.push(weights)
        assert result.engines_in_sync == 2 and result.bytes > 0
        assert list((tmp_path / "shared").iterdir()) == [], "the pushed checkpoint directory is cleaned up"
    finally:
        loop.run(by_checkpoint_coordinator.stop())
    by_checkpoint = [support.engine_logprobs(e.base_url) for e in cpu_engines]
    for gloo_choices, ckpt_choices in zip(by_gloo, by_checkpoint, strict=True):
        for a, b in zip(gloo_choices, ckpt_choices, strict=True):
            assert a["token_ids"] == b["token_ids"]
            assert max(abs(x - y) for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"],
                                                  strict=True)) < 1e-5  # fmt: skip
    coordinator.version = max(coordinator.version or 0, result.version)  # the engines moved on without it


def test_versions_increase_across_methods_and_a_coordinator_restart(
    coordinator: SyncCoordinator, loop: support.LoopThread, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A checkpoint push and a broadcast push once both got version 4: one ledger per job now orders them all."""
    with TrainerClient(address(coordinator)) as trainer:
        start = trainer.push(support.perturbed_state(tiny_model_dir, seed=20)).version
    shared = coordinator.config.model_copy(deep=True)
    shared.sync = shared.sync.model_copy(update={"method": "checkpoint", "checkpoint_path": str(tmp_path / "shared"),
                                                 "port": free_port()})  # fmt: skip
    by_checkpoint = support.start_coordinator(loop, shared, state_dir=coordinator.state_dir)
    try:
        with TrainerClient(address(by_checkpoint)) as trainer:
            assert trainer.push(support.perturbed_state(tiny_model_dir, seed=21)).version == start + 1
    finally:
        loop.run(by_checkpoint.stop())
    assert coordinator.version == start, "the broadcast coordinator did not see that push"
    with TrainerClient(address(coordinator)) as trainer:
        assert trainer.push(support.perturbed_state(tiny_model_dir, seed=22)).version == start + 2

    restarted_cfg = coordinator.config.model_copy(deep=True)
    restarted_cfg.sync = restarted_cfg.sync.model_copy(update={"port": free_port()})
    restarted = support.start_coordinator(loop, restarted_cfg, state_dir=coordinator.state_dir)
    try:
        assert restarted.newest_version == start + 2
        with TrainerClient(address(restarted)) as trainer:
            with pytest.raises(SyncRefusedError, match=rf"version {start + 1} is not newer than the current policy "
                                                       rf"version {start + 2}") as refused:  # fmt: skip
                trainer.push(support.perturbed_state(tiny_model_dir, seed=23), version=start + 1)
            assert refused.value.status == 409
            assert trainer.push(support.perturbed_state(tiny_model_dir, seed=23)).version == start + 3
    finally:
        loop.run(restarted.stop())
    assert versions.load_version(coordinator.state_dir) == start + 3


def test_a_second_trainer_gets_409_naming_the_holder_until_the_first_closes(
    coordinator: SyncCoordinator, cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path
) -> None:
    first = TrainerClient(address(coordinator), trainer_id="trainer-a@host-1")
    try:
        first.push(support.perturbed_state(tiny_model_dir, seed=30))
        with TrainerClient(address(coordinator), trainer_id="trainer-b@host-2") as second:
            with pytest.raises(SyncRefusedError, match="held by trainer 'trainer-a@host-1'") as refused:
                second.setup(support.perturbed_state(tiny_model_dir, seed=31))
            assert refused.value.status == 409
            owners = first.push(support.perturbed_state(tiny_model_dir, seed=32))  # its group was left alone
            assert owners.engines_in_sync == 2
            first.close()
            newest = support.perturbed_state(tiny_model_dir, seed=33)
            assert second.push(newest).version == owners.version + 1
    finally:
        first.close()
    assert max(served_errors(cpu_engines, tiny_model_dir, newest)) < TOLERANCE


def test_float64_metadata_is_refused_naming_the_tensor_and_the_client_casts_float64_weights(
    coordinator: SyncCoordinator, cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path
) -> None:
    good = support.perturbed_state(tiny_model_dir, seed=40)
    with TrainerClient(address(coordinator)) as trainer:
        info = trainer.setup(good)
        assert info.dtype == "float32"
        wide = [{**m.to_wire(), "dtype": "float64"} if m.name == "model.norm.weight" else m.to_wire()
                for m in protocol.describe(good.items())]  # fmt: skip
        version = coordinator.version
        response = trainer.http.post("/v1/sync/push", json={"incarnation": info.incarnation, "tensors": wide})
        assert response.status_code == 422, response.text
        assert "tensor 'model.norm.weight' has dtype float64, the served model's is float32" in response.json()["error"]
        assert coordinator.version == version
        # float64 master weights are fine: the client casts them to the served dtype before they are described.
        assert trainer.push({n: t.double() for n, t in good.items()}).engines_in_sync == 2
    assert max(served_errors(cpu_engines, tiny_model_dir, good)) < TOLERANCE


def test_checkpoint_directories_outside_the_checkpoint_path_are_refused(
    coordinator: SyncCoordinator, loop: support.LoopThread, cpu_engines: list[local_engine.LocalEngine],
    tiny_model_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    from safetensors.torch import save_file

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file(support.perturbed_state(tiny_model_dir, seed=50), str(outside / "model.safetensors"))
    root = tmp_path / "shared"
    root.mkdir()
    (root / "escape").symlink_to(outside)
    cfg = coordinator.config.model_copy(deep=True)
    cfg.sync = cfg.sync.model_copy(update={"method": "checkpoint", "checkpoint_path": str(root), "port": free_port()})
    by_checkpoint = support.start_coordinator(loop, cfg, state_dir=coordinator.state_dir)
    pushes = by_checkpoint.syncs  # the job's pushes so far (it shares the other coordinator's ledger)
    before = [support.engine_logprobs(e.base_url) for e in cpu_engines]
    try:
        with TrainerClient(address(by_checkpoint)) as trainer:
            info = trainer.setup(support.original_state(tiny_model_dir))
            for directory in (str(outside), str(root / ".." / "elsewhere"), str(root / "escape")):
                response = trainer.http.post(
                    "/v1/sync/checkpoint", json={"incarnation": info.incarnation, "checkpointDir": directory}
                )
                assert response.status_code == 422, response.text
                assert "not inside sync.checkpointPath" in response.json()["error"]
    finally:
        loop.run(by_checkpoint.stop())
    assert by_checkpoint.syncs == pushes  # no refused directory counted as a push
    assert [support.engine_logprobs(e.base_url) for e in cpu_engines] == before


def test_bad_json_is_a_400_with_a_message(coordinator: SyncCoordinator) -> None:
    for path in ("/v1/sync/group", "/v1/sync/push", "/v1/sync/checkpoint"):
        response = httpx.post(f"http://{address(coordinator)}{path}", content=b"{not json", timeout=30,
                              headers=trainer_headers())  # fmt: skip
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"].startswith("invalid request body: body: Invalid JSON")


def test_the_group_forms_over_the_authenticated_store_and_nobody_else_can_write_a_rank(
    coordinator: SyncCoordinator, cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path
) -> None:
    """No TCPStore: a planted rank-0 address (the way into every engine's receive buffer) is refused from anyone but
    the trainer, a rank already joined cannot be overwritten, and the store closes once the group has formed."""
    base = f"http://{address(coordinator)}"
    state = support.original_state(tiny_model_dir)
    body = {"tensors": [m.to_wire() for m in protocol.describe(state.items())]}
    info = protocol.GroupInfo.model_validate(httpx.post(f"{base}/v1/sync/group", json=body, timeout=120,
                                                        headers=trainer_headers()).json())  # fmt: skip
    store = f"{base}{formation_store.ROUTE.format(incarnation=info.incarnation)}"

    def put(key: str, headers: dict[str, str]) -> httpx.Response:
        return httpx.put(store, params={"key": key}, content=b"planted", headers=headers, timeout=30)

    # The engines are joining now: each has written its own rank's key (gloo's address record) and waits for rank 0.
    engine_key = httpx.get(store, params={"key": "0/1", "wait": "20"}, headers=job_headers(), timeout=60)
    assert engine_key.status_code == 200 and len(engine_key.content) > 16, engine_key.text
    assert put("0/0", {}).status_code == 401
    assert put("0/0", {"Authorization": "Bearer wrong"}).status_code == 401
    assert put("0/0", job_headers()).status_code == 403, "job-token holders (workflow code) cannot pose as rank 0"
    assert put("0/1", job_headers()).status_code == 409, "a rank already joined cannot be replaced"
    assert put("0/2", trainer_headers()).status_code == 403, "the trainer cannot pose as an engine"
    assert httpx.get(store, params={"key": "0/1"}, timeout=30).status_code == 401, "nor read without a token"

    member = formation_store.gloo_group(base, info.incarnation, credentials.trainer_tokens()[0], 0, info.world_size,
                                        info.timeout_seconds)  # fmt: skip
    try:
        joined = httpx.post(f"{base}/v1/sync/group/{info.incarnation}/joined", headers=trainer_headers(), timeout=120)
        assert joined.status_code == 200, joined.text
        after = put("0/0", trainer_headers())
        assert after.status_code == 409 and "closed" in after.json()["error"], after.text
        assert httpx.get(store, params={"key": "0/1"}, headers=job_headers(), timeout=30).status_code == 409
    finally:
        member.shutdown()
        httpx.post(f"{base}/v1/sync/leave", json={}, headers=trainer_headers(), timeout=30)  # hand the group back
    with TrainerClient(address(coordinator)) as trainer:  # the engines form the next group as usual
        assert trainer.push(state).engines_in_sync == 2
    assert max(served_errors(cpu_engines, tiny_model_dir, state)) < TOLERANCE


@pytest.mark.timeout(900)
def test_a_scaled_up_engine_catches_up_and_serves_and_a_scaled_down_one_gets_nothing_more(
    coordinator: SyncCoordinator, loop: support.LoopThread, ray_cluster: None,
    cpu_engines: list[local_engine.LocalEngine], tiny_model_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """The coordinator follows its config file as the operator rewrites it on ``kubectl scale`` (``membership``):
    an added engine is brought to the job's version from a peer before it gets a request, runners are added for it,
    and after a scale-down the removed engine gets no more requests while the trainer pushes to the rest."""
    config_file = tmp_path / "explorer.yaml"

    def write_config(engines: list[local_engine.LocalEngine]) -> None:
        cfg = support.sync_config([e.base_url for e in engines], tiny_model_dir, tmp_path, alone.api_port)
        staged = tmp_path / ".explorer.yaml.new"  # replaced in one step, as kubelet swaps a ConfigMap volume
        staged.write_text(yaml.safe_dump(cfg.to_wire()))
        staged.replace(config_file)

    alone = support.start_coordinator(loop, support.sync_config([cpu_engines[0].base_url], tiny_model_dir, tmp_path,
                                                                free_port()))  # fmt: skip
    write_config(cpu_engines[:1])
    rotation = RotationProbe(alone, loop, cpu_engines[:1])
    follower = asyncio.run_coroutine_threadsafe(membership.follow_config(rotation.explorer, config_file, 0.2),
                                                loop.loop)  # fmt: skip
    result = None
    try:
        with TrainerClient(address(alone)) as trainer:
            pushed = support.perturbed_state(tiny_model_dir, seed=13)
            # Newer than anything either engine serves (earlier tests pushed with other coordinators' ledgers), so
            # engine 1 cannot already report this version.
            served = [httpx.get(f"{e.base_url}/weight_info", headers=job_headers()).json().get("weight_version")
                      for e in cpu_engines]  # fmt: skip
            newest = max((int(v) for v in served if isinstance(v, str) and v.isdigit()), default=0)
            version = trainer.push(pushed, version=newest + 1).version
            assert rotation.served_per_engine(1) >= [8]
            runners, hosts = len(rotation.sched.runners), len(rotation.sched.hosts)

            write_config(cpu_engines)  # kubectl scale --replicas=2
            wait_for(lambda: rotation.sched.engine_load and len(rotation.sched.engine_load.serving) == 2, timeout=30,
                     what="the coordinator follows the rewritten config")  # fmt: skip
            assert alone.scales == 1
            rotation.engines = cpu_engines
            wait_for(lambda: rotation.observe() == [True, True], timeout=180, what="the added engine caught up")
            assert alone.catch_ups == 1 and alone.engine_versions == [str(version)] * 2
            assert max(served_errors(cpu_engines, tiny_model_dir, pushed)) < TOLERANCE
            assert len(rotation.sched.runners) == 2 * runners, "runnersPerEngine for the added engine too"
            added_hosts = rotation.sched.hosts[hosts:]
            assert added_hosts
            assert min(rotation.served_per_engine(2)) > 0, "the added engine serves"

            write_config(cpu_engines[:1])  # and back to one
            wait_for(lambda: rotation.sched.engine_load and len(rotation.sched.engine_load.serving) == 1, timeout=30,
                     what="the coordinator follows the scale-down")  # fmt: skip
            assert alone.scales == 2
            served = rotation.served_per_engine(3)
            assert served[1] == 0 and served[0] >= 8, f"requests per engine {served}: the removed engine served"
            # The runners added for engine 1 are retired once idle, and their processes stopped.
            assert len(rotation.sched.runners) == runners
            wait_for(lambda: len(rotation.sched.hosts) == hosts, timeout=60, what="the added runner processes retire")
            for host in added_hosts:
                with pytest.raises(ray.exceptions.RayActorError):
                    ray.get(host.actor.ping.remote(), timeout=30)
            result = trainer.push(support.perturbed_state(tiny_model_dir, seed=14))  # re-forms over one engine
            assert result.engines == result.engines_in_sync == 1
    finally:
        follower.cancel()
        rotation.stop()
        loop.run(alone.stop())
    # The module's coordinator did not see these pushes: its next version must still be newer than what engines serve.
    coordinator.version = max(coordinator.version or 0, result.version if result else 0, alone.newest_version)
