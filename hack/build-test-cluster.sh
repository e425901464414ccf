#!/usr/bin/env bash
# Build the binaries of the test control plane from their Go modules, at pinned versions.
#
#   hack/build-test-cluster.sh            # build what is missing or at another version
#   hack/build-test-cluster.sh --force    # rebuild everything
#
# Output: .cache/bin/{etcd,kube-apiserver,kube-controller-manager,kube-scheduler,kwok,helm,kstatus} for the
# control plane and the tests, and {kubelet,containerd,containerd-shim-runc-v2,ctr} for the real node beside
# the kwok nodes (tests/harness/node.py); each with a stamp file .cache/bin/.<name>.version holding the version
# it was built at. A binary whose stamp
# matches is reused, so a warm run does nothing. Builds are CGO_ENABLED=0, -trimpath, stripped, and go
# through the Go module proxy (GOPROXY from `go env`). Downloads land in the normal module cache
# (GOMODCACHE, ~/go/pkg/mod by default) and objects in GOCACHE, so a rebuild does not re-download.
#
# Each binary comes from a small wrapper module generated under .cache/build/<name>/ (main module
# with a go.mod that requires the pinned version). kubernetes is not meant to be used as a module:
# its go.mod requires every k8s.io staging module at v0.0.0 and replaces them with ./staging paths,
# which do not apply to a dependency. The wrapper reads that list from the downloaded go.mod and
# replaces each with the matching published v0.X.Y tag (v1.37.2 -> v0.37.2).
set -euo pipefail

ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.37.2}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
# kstatus (hack/kstatus/main.go) is a test tool on sigs.k8s.io/cli-utils' kstatus library.
CLI_UTILS_VERSION="${CLI_UTILS_VERSION:-v0.37.2}"
# The real node's kubelet. The version skew policy allows a kubelet up to three minors older than the
# apiserver; v1.37 runs on this machine kind's cgroup v1 hierarchy with failCgroupV1: false.
KUBELET_VERSION="${KUBELET_VERSION:-$KUBERNETES_VERSION}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${VISIONFT_BIN_DIR:-$ROOT/.cache/bin}"
WORK="$ROOT/.cache/build"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
# Never let a dependency's `toolchain` line trigger a toolchain download.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

log() { printf '[build-test-cluster] %s\n' "$*" >&2; }

if ! command -v go >/dev/null; then
  log "Go 1.26 or newer is needed on PATH (https://go.dev/dl/)"
  exit 1
fi
mkdir -p "$BIN" "$WORK"
# One build at a time, also across sessions that share this checkout.
exec 9>"$WORK/.lock"
if ! flock -n 9; then
  log "another build-test-cluster.sh is running; waiting for it"
  flock 9
fi

# up_to_date NAME VERSION -> 0 when .cache/bin/NAME exists and its stamp says VERSION.
up_to_date() {
  [[ $FORCE == 0 && -x "$BIN/$1" && -f "$BIN/.$1.version" && "$(cat "$BIN/.$1.version")" == "$2" ]]
}
stamp() { printf '%s\n' "$2" >"$BIN/.$1.version"; }

# new_module DIR MODULE VERSION: a wrapper main module that requires MODULE@VERSION.
new_module() {
  local dir="$1" mod="$2" ver="$3"
  mkdir -p "$dir"
  printf 'module visionft.test/%s\n\ngo 1.26.0\n\nrequire %s %s\n' "$(basename "$dir")" "$mod" "$ver" >"$dir/go.mod"
}

timed() {  # timed LABEL CMD... : runs CMD and prints how long it took
  local label="$1" start end
  shift
  start=$(date +%s)
  "$@"
  end=$(date +%s)
  log "$label: built in $((end - start)) s"
}

build_etcd() {
  if up_to_date etcd "$ETCD_VERSION"; then log "etcd $ETCD_VERSION: up to date"; return; fi
  local dir="$WORK/etcd"
  rm -rf "$dir"
  new_module "$dir" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  # server/v3 has no main package of its own; etcdmain.Main is what etcd's main.go calls.
  cat >"$dir/main.go" <<'EOF'
// Command etcd: the etcd server, built from go.etcd.io/etcd/server/v3 for the VisionFT tests.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  log "etcd $ETCD_VERSION: building"
  (cd "$dir" && timed "etcd $ETCD_VERSION" go build -mod=mod -trimpath -ldflags "-s -w" -o "$BIN/etcd" .)
  stamp etcd "$ETCD_VERSION"
}

KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler)

# kubernetes_module DIR VERSION: a wrapper module that requires k8s.io/kubernetes@VERSION, with every
# `k8s.io/<name> v0.0.0` requirement of kubernetes (a staging module) replaced by its published tag.
kubernetes_module() {
  local dir="$1" version="$2" gomod staging_ver
  rm -rf "$dir"
  new_module "$dir" k8s.io/kubernetes "$version"
  gomod="$(go mod download -json "k8s.io/kubernetes@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  staging_ver="v0.${version#v1.}"
  {
    printf '\nreplace (\n'
    awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }' "$gomod" | sort -u |
      while read -r m; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_ver"; done
    printf ')\n'
  } >>"$dir/go.mod"
  log "kubernetes $version: $(grep -c '=>' "$dir/go.mod") staging modules replaced at $staging_ver"
}

# kubernetes_ldflags VERSION: the version stamp that `kubectl version` and /version report.
kubernetes_ldflags() {
  local version="$1" minor v=k8s.io/component-base/version
  minor="${version#v1.}"
  minor="${minor%%.*}"
  printf '%s' "-s -w -X $v.gitVersion=$version -X $v.gitMajor=1 -X $v.gitMinor=$minor" \
    " -X $v.gitTreeState=clean -X $v.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}

# build_kubernetes NAME VERSION BINARY...: the kubernetes commands BINARY... at VERSION, in one go build of a
# wrapper module .cache/build/NAME (the real node's kubelet has its own, since it may be an older minor than
# the control plane's).
build_kubernetes() {
  local name="$1" version="$2" all=1 b
  shift 2
  for b in "$@"; do up_to_date "$b" "$version" || all=0; done
  if [[ $all == 1 ]]; then log "$* $version: up to date"; return; fi
  local dir="$WORK/$name"
  kubernetes_module "$dir" "$version"
  local pkgs=()
  for b in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  log "kubernetes $version: building $* in one go build"
  (cd "$dir" && timed "kubernetes $version ($*)" \
    go build -mod=mod -trimpath -ldflags "$(kubernetes_ldflags "$version")" -o "$BIN/" "${pkgs[@]}")
  for b in "$@"; do stamp "$b" "$version"; done
}

CONTAINERD_BINS=(containerd containerd-shim-runc-v2 ctr)

# containerd 2.x, its runc shim and ctr (the kubelet's CRI runtime; runc itself is Debian's). CGO off: the
# btrfs snapshotter and other cgo-only parts drop out, overlayfs stays.
build_containerd() {
  local all=1 b
  for b in "${CONTAINERD_BINS[@]}"; do up_to_date "$b" "$CONTAINERD_VERSION" || all=0; done
  if [[ $all == 1 ]]; then log "containerd $CONTAINERD_VERSION: up to date"; return; fi
  local dir="$WORK/containerd" mod=github.com/containerd/containerd/v2
  rm -rf "$dir"
  new_module "$dir" "$mod" "$CONTAINERD_VERSION"
  local pkgs=()
  for b in "${CONTAINERD_BINS[@]}"; do pkgs+=("$mod/cmd/$b"); done
  log "containerd $CONTAINERD_VERSION: building ${CONTAINERD_BINS[*]} in one go build"
  (cd "$dir" && timed "containerd $CONTAINERD_VERSION" go build -mod=mod -trimpath \
    -ldflags "-s -w -X $mod/version.Version=$CONTAINERD_VERSION -X $mod/version.Package=$mod" -o "$BIN/" "${pkgs[@]}")
  for b in "${CONTAINERD_BINS[@]}"; do stamp "$b" "$CONTAINERD_VERSION"; done
}

# build_tool NAME MODULE VERSION PACKAGE LDFLAGS
build_tool() {
  local name="$1" mod="$2" ver="$3" pkg="$4" ldflags="$5"
  if up_to_date "$name" "$ver"; then log "$name $ver: up to date"; return; fi
  local dir="$WORK/$name"
  rm -rf "$dir"
  new_module "$dir" "$mod" "$ver"
  log "$name $ver: building"
  (cd "$dir" && timed "$name $ver" go build -mod=mod -trimpath -ldflags "-s -w $ldflags" -o "$BIN/$name" "$pkg")
  stamp "$name" "$ver"
}

# build_kstatus: hack/kstatus/main.go on the pinned cli-utils; its stamp also holds the source's hash, so
# that an edited checker is rebuilt.
build_kstatus() {
  local src="$ROOT/hack/kstatus/main.go" ver
  ver="$CLI_UTILS_VERSION-$(sha256sum "$src" | cut -c1-12)"
  if up_to_date kstatus "$ver"; then log "kstatus $ver: up to date"; return; fi
  local dir="$WORK/kstatus"
  rm -rf "$dir"
  new_module "$dir" sigs.k8s.io/cli-utils "$CLI_UTILS_VERSION"
  cp "$src" "$dir/main.go"
  log "kstatus $ver: building"
  (cd "$dir" && timed "kstatus $ver" go build -mod=mod -trimpath -ldflags "-s -w" -o "$BIN/kstatus" .)
  stamp kstatus "$ver"
}

total_start=$(date +%s)
log "Go $(go env GOVERSION), GOPROXY=$(go env GOPROXY), GOMODCACHE=$(go env GOMODCACHE), GOCACHE=$(go env GOCACHE)"
build_etcd
build_kubernetes kubernetes "$KUBERNETES_VERSION" "${KUBE_BINS[@]}"
# kwok's version string (pkg/consts.Version) is already right in its tagged source.
build_tool kwok sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok ""
build_tool helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build_kstatus
# The real node's kubelet. No kube-proxy: the harness routes the one ClusterIP pods use (tests/harness/node.py).
build_kubernetes kubelet "$KUBELET_VERSION" kubelet
build_containerd
log "all binaries ready in $BIN ($(($(date +%s) - total_start)) s)"
