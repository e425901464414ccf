#!/usr/bin/env bash
# Build VisionFT's container images on this machine, with no registry and no Docker daemon (podman, runc).
#
#   hack/build-images.sh            # build what is missing or whose inputs changed
#   hack/build-images.sh --force    # rebuild everything
#   hack/build-images.sh --check    # build nothing; exit 1 when an image is missing or its inputs changed
#
# Images, each named localhost/visionft/<name> and tagged with a key of its inputs (a tag that exists is not
# built again, so a warm machine rebuilds only what changed):
#   base      Debian 12 (minbase) with python3, made by mmdebstrap from this machine's own apt sources and
#             imported with `podman import`
#   pause     the pod sandbox image for containerd: Debian's static catatonit as /pause
#   operator  Dockerfile.operator on base
#   trainer   Dockerfile.trainer on base, the CPU variant (PYTHON=python3.11, EXTRAS=trainer)
#
# Python packages come from a wheelhouse: `pip download` of the pinned dependencies, once per content of
# constraints.txt and pyproject.toml, mounted read-only into the builds, which then run with no network.
# Heavy state (podman's storage, the wheelhouse) lives in $VISIONFT_IMAGE_CACHE (default
# ~/.cache/visionft), shared by every checkout on the machine as Go's caches are. The built references go
# to .cache/images.json, which the tests read (tests/harness/node.py: Images).
#
# Needs root and Debian's podman, buildah, runc, mmdebstrap and catatonit (scripts/setup.sh installs them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VISIONFT_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/visionft}"
REFS="$ROOT/.cache/images.json"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
SUITE=bookworm
BASE_PYTHON=python3.11
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
APT_SOURCES="${APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
FORCE=0 CHECK=0
case "${1:-}" in
  --force) FORCE=1 ;;
  --check) CHECK=1 ;;
  "") ;;
  *) echo "usage: $0 [--force | --check]" >&2; exit 2 ;;
esac

log() { printf '[build-images] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

for tool in podman mmdebstrap catatonit runc; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install -y --no-install-recommends podman buildah runc containernetworking-plugins mmdebstrap catatonit uidmap iptables"
done
[[ $(id -u) == 0 ]] || die "podman's storage here is root's (runc, overlay): run as root"
[[ -x "$PYTHON" ]] || die "no Python at $PYTHON: run scripts/setup.sh (it makes .venv) or set PYTHON"
[[ -f "$APT_SOURCES" ]] || die "no apt sources at $APT_SOURCES (set APT_SOURCES to a deb822 .sources file)"

mkdir -p "$CACHE/containers" "$CACHE/wheelhouse" "$ROOT/.cache"
exec 9>"$CACHE/.build-images.lock"
if ! flock -n 9; then
  log "another build-images.sh is running; waiting for it"
  flock 9
fi

# Podman for this machine kind: runc (crun refuses hybrid cgroups), cgroupfs (no systemd), ulimits within
# the hard limits (no CAP_SYS_RESOURCE), storage of our own (its run-time state one per cache folder, so
# that two caches on one machine never share it).
cat >"$CACHE/containers/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
EOF
cat >"$CACHE/containers/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/containers/storage"
runroot = "/run/visionft-containers-$(printf '%s' "$CACHE" | sha256sum | cut -c1-12)"
EOF
export CONTAINERS_CONF="$CACHE/containers/containers.conf"
export CONTAINERS_STORAGE_CONF="$CACHE/containers/storage.conf"

hash_of() { sha256sum | cut -c1-16; }
# The build context's files that a Dockerfile copies, hashed by content (no mtimes, no owners, no caches).
hash_paths() {
  (cd "$ROOT" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - "$@") | hash_of
}
exists() { [[ $FORCE == 0 ]] && podman image exists "$1"; }
image_id() { podman image inspect --format '{{.Id}}' "$1"; }
image_size() { podman image inspect --format '{{.Size}}' "$1"; }
# drop_other_tags REPO KEEP: untag the repo's older builds (layers that other images use stay).
drop_other_tags() {
  local ref
  for ref in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$1"); do
    [[ $ref == "$2" ]] || podman rmi "$ref" >/dev/null 2>&1 || true
  done
}
STALE=()
# build NAME REF WHAT CMD...: unless REF exists, run CMD to make it (WHAT says how) and untag the repository's
# other builds; with --check, only note that it would be built.
build() {
  local name="$1" ref="$2" what="$3" start=$SECONDS
  shift 3
  if exists "$ref"; then log "$name $ref: up to date"; return; fi
  if [[ $CHECK == 1 ]]; then log "$name $ref: would be built ($what)"; STALE+=("$name"); return; fi
  log "$name $ref: $what"
  "$@"
  drop_other_tags "${ref%:*}" "$ref"
  log "$name: built in $((SECONDS - start)) s"
}

# ---------------------------------------------------------------------------------------------- base
build_base_image() {
  local tar="$CACHE/base-$SUITE.partial.tar"
  mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/usr/share/doc "$1"/usr/share/man' \
    "$SUITE" "$tar" "$APT_SOURCES"
  podman import --quiet --change 'CMD ["python3"]' "$tar" "$BASE" >/dev/null
  rm -f "$tar"
}
base_key="$({
  printf '%s\n' "$SUITE" "$BASE_PACKAGES" "$(mmdebstrap --version)" "customize: apt lists, docs, man removed"
  cat "$APT_SOURCES"
} | hash_of)"
BASE="localhost/visionft/base:$SUITE-$base_key"
build base "$BASE" "mmdebstrap $SUITE with $BASE_PACKAGES" build_base_image
# The other images' keys hold the base's image id.
[[ ${#STALE[@]} == 0 ]] || die "the base image is missing or out of date: run $0"

# --------------------------------------------------------------------------------------------- pause
build_pause_image() {
  local dir
  dir="$(mktemp -d)"
  install -m 0755 "$(command -v catatonit)" "$dir/pause"
  tar -C "$dir" -cf "$dir.tar" pause
  podman import --quiet --change 'ENTRYPOINT ["/pause", "-P"]' "$dir.tar" "$PAUSE" >/dev/null
  rm -rf "$dir" "$dir.tar"
}
PAUSE="localhost/visionft/pause:catatonit-$(dpkg-query -W -f '${Version}' catatonit | tr -c 'A-Za-z0-9_.\n-' _)"
build pause "$PAUSE" "catatonit as /pause" build_pause_image

# ---------------------------------------------------------------------------------------- wheelhouse
# The wheels must suit the base's interpreter: pip here downloads for its own, so the two must match;
# otherwise the builds fetch from the index themselves (network on, with the host's CA bundle).
host_python="$("$PYTHON" -c 'import sys; print("python%d.%d" % sys.version_info[:2])')"
build_args=()
# What the images install: the requirements of the operator and trainer extras, pinned by constraints.txt.
requirements="$("$PYTHON" -c 'import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(sorted({*project["dependencies"], *extras["operator"], *extras["trainer"]})))' "$ROOT/pyproject.toml")"
if [[ $host_python == "$BASE_PYTHON" ]]; then
  wheel_key="$({ cat "$ROOT/constraints.txt"; echo "$requirements" "$host_python"; } | hash_of)"
  WHEELHOUSE="$CACHE/wheelhouse/$wheel_key"
  if [[ -f "$WHEELHOUSE/.complete" ]]; then log "wheelhouse $WHEELHOUSE: up to date"
  elif [[ $CHECK == 1 ]]; then log "wheelhouse $WHEELHOUSE: would be downloaded"; STALE+=(wheelhouse)
  else
    fetch_wheels() {
      rm -rf "$WHEELHOUSE.partial"
      mkdir -p "$WHEELHOUSE.partial"
      echo "$requirements" >"$WHEELHOUSE.partial/.requirements.txt"
      # setuptools and wheel build the project itself (pyproject.toml's build-system) inside the builds.
      "$PYTHON" -m pip download --quiet --disable-pip-version-check -d "$WHEELHOUSE.partial" \
        -c "$ROOT/constraints.txt" -r "$WHEELHOUSE.partial/.requirements.txt" "setuptools>=77" wheel
      touch "$WHEELHOUSE.partial/.complete"
      rm -rf "$WHEELHOUSE" && mv "$WHEELHOUSE.partial" "$WHEELHOUSE"
      find "$CACHE/wheelhouse" -mindepth 1 -maxdepth 1 ! -name "$wheel_key" -exec rm -rf {} +
    }
    log "wheelhouse $WHEELHOUSE: pip download of the pinned dependencies"
    fetch_wheels
  fi
  build_args+=(--network none -v "$WHEELHOUSE:/wheelhouse:ro" --build-arg WHEELHOUSE=/wheelhouse)
else
  wheel_key="index"
  log "host $host_python != base $BASE_PYTHON: no wheelhouse, the builds download from the package index"
  build_args+=(--network host -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  [[ -f /etc/pip.conf ]] && build_args+=(-v /etc/pip.conf:/etc/pip.conf:ro)
fi

# ------------------------------------------------------------------------------------ operator, trainer
# `--format docker` keeps SHELL and HEALTHCHECK, which the OCI format drops.
podman_build() {  # podman_build REF DOCKERFILE BUILD-ARG...
  local ref="$1" dockerfile="$2" build_log="$CACHE/logs/${2#Dockerfile.}.log"
  shift 2
  mkdir -p "$CACHE/logs"
  if ! (cd "$ROOT" && podman build --format docker --layers --pull=never "${build_args[@]}" \
    "$@" -f "$dockerfile" -t "$ref" . >"$build_log" 2>&1); then
    tail -n 40 "$build_log" >&2
    die "podman build -f $dockerfile failed; the whole log is $build_log"
  fi
}

operator_key="$({ cat "$ROOT/Dockerfile.operator"; image_id "$BASE"; echo "$wheel_key"
  hash_paths pyproject.toml README.md constraints.txt api operator; } | hash_of)"
OPERATOR="localhost/visionft/operator:$operator_key"
build operator "$OPERATOR" "Dockerfile.operator on $BASE" \
  podman_build "$OPERATOR" Dockerfile.operator --build-arg PYTHON_IMAGE="$BASE"

trainer_args=(--build-arg BASE_IMAGE="$BASE" --build-arg PYTHON="$BASE_PYTHON" --build-arg EXTRAS=trainer)
trainer_key="$({ cat "$ROOT/Dockerfile.trainer"; image_id "$BASE"; echo "$wheel_key" "${trainer_args[*]}"
  hash_paths pyproject.toml README.md constraints.txt api trainer deploy/docker; } | hash_of)"
TRAINER="localhost/visionft/trainer:cpu-$trainer_key"
build trainer "$TRAINER" "Dockerfile.trainer (CPU) on $BASE" \
  podman_build "$TRAINER" Dockerfile.trainer "${trainer_args[@]}"

if [[ $CHECK == 1 ]]; then
  [[ ${#STALE[@]} == 0 ]] || die "to build: ${STALE[*]}; run $0"
  exit 0
fi

# Untagged layers of earlier builds (a replaced dependency layer is several GB); the cache of these builds stays.
podman image prune --force >/dev/null

"$PYTHON" - "$REFS" <<EOF
import json, sys
refs = {
    "base": "$BASE", "pause": "$PAUSE", "operator": "$OPERATOR", "trainer": "$TRAINER",
    "containers_conf": "$CONTAINERS_CONF", "storage_conf": "$CONTAINERS_STORAGE_CONF",
    "sizes": {"operator": $(image_size "$OPERATOR"), "trainer": $(image_size "$TRAINER")},
}
with open(sys.argv[1], "w") as out:
    json.dump(refs, out, indent=2)
    out.write("\n")
EOF
log "operator $(($(image_size "$OPERATOR") / 1000000)) MB, trainer $(($(image_size "$TRAINER") / 1000000)) MB; references in $REFS"
