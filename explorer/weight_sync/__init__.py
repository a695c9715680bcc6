"""Weight sync: the trainer's new weights reach every engine at once, all or nothing, through the coordinator.

``protocol`` is the pure wire format (metadata, packing, rank layout); ``engine_ext`` runs inside each vLLM worker
(the staged "gloo"/"explorer_nccl" backends); ``rendezvous`` is the coordinator's side (the group store, the
control API, the engine driver); ``trainer`` is the client library a trainer uses.
"""
