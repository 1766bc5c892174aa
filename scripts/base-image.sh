#!/usr/bin/env bash
# Makes the local base image the CPU image and the test containers start from, without a
# registry: `debootstrap --variant=minbase` of this machine's Debian release from the mirror
# apt already uses, imported with `docker import`. Built once per machine (cached by tag);
# `--force` rebuilds it. Prints the tag.
set -euo pipefail
tag="${SIMMIM_BASE_IMAGE:-simmim-base:bookworm}"
force="${1:-}"
if [ "$force" != "--force" ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v debootstrap >/dev/null; then
  echo "base-image: installing debootstrap" >&2
  as_root apt-get update -qq >&2 && as_root apt-get install -y -qq debootstrap >&2
fi
# shellcheck disable=SC1091
release="$(. /etc/os-release && echo "${VERSION_CODENAME}")"
# The mirror apt uses here (deb822 sources first, then the one-line format).
mirror="$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)"
if [ -z "$mirror" ]; then
  mirror="$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d /tmp/simmim-base.XXXXXX)"
trap 'as_root rm -rf "$root"' EXIT
echo "base-image: debootstrap --variant=minbase $release from $mirror" >&2
as_root debootstrap --variant=minbase --include=ca-certificates "$release" "$root" "$mirror" >&2
# Smaller: no apt lists, caches, docs or man pages in the base.
as_root rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
as_root tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$tag" >&2
echo "$tag"
