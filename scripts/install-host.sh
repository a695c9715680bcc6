#!/usr/bin/env bash
# Installs the Debian packages real nodes and image builds need (CNI plugins, iptables/ipset/conntrack for
# kube-proxy and kube-router, libseccomp for runc, mmdebstrap for the base image); does nothing when all are there.
set -euo pipefail

packages=(containernetworking-plugins iptables ipset conntrack libseccomp-dev pkg-config mmdebstrap socat
  e2fsprogs uidmap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "install-host: need root to install: ${missing[*]}" >&2
  exit 1
fi
started=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "install-host: ${missing[*]} in $(( $(date +%s) - started ))s"
