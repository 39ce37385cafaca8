#!/usr/bin/env bash
# Installs the Debian packages the one-node test cluster needs: containerd and runc (the container
# runtime), the CNI plugins (bridge, host-local, portmap), iptables and conntrack (kube-proxy),
# debootstrap (the base image) and buildah (builds the Dockerfile's operator target).
# Only what is missing is installed; a no-op on a machine that has them all.
set -euo pipefail

declare -A provides=(
	[containerd]=containerd
	[runc]=runc
	[containernetworking-plugins]=/usr/lib/cni/bridge
	[iptables]=iptables
	[conntrack]=conntrack
	[debootstrap]=debootstrap
	[buildah]=buildah
)
missing=()
for package in "${!provides[@]}"; do
	what=${provides[$package]}
	if [[ $what == /* ]]; then
		[[ -e $what ]] || missing+=("$package")
	else
		command -v "$what" >/dev/null 2>&1 || [[ -x /usr/sbin/$what ]] || missing+=("$package")
	fi
done
if ((${#missing[@]} == 0)); then
	exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
	echo "install-node-packages: missing ${missing[*]}; rerun as root" >&2
	exit 1
fi
echo "install-node-packages: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
