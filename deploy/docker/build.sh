#!/usr/bin/env bash
# Builds container images without pulling anything:
#   deploy/docker/build.sh              -> courier:latest (release build of this checkout)
#   deploy/docker/build.sh prometheus   -> courier-prometheus:latest, from the
#                                          prometheus binary installed here
#                                          (Debian package `prometheus`)
#   deploy/docker/build.sh etcd         -> courier-etcd:latest (etcd and etcdctl,
#                                          Debian package `etcd-server`)
#   deploy/docker/build.sh haproxy      -> courier-haproxy:latest (Debian package
#                                          `haproxy`)
# BIN=path/to/courier packs that binary instead of building one (the tests
# pack the binary they already built); IMAGE=name:tag names the image.
# Each image is the binary plus the shared libraries `ldd` lists, on an empty
# file system (FROM scratch). The courier binary goes in stripped; its debug
# information stays beside the build (`<target>/<profile>/courier.debug`,
# found by the stripped binary's debug link) for profiling and symbolizing
# a core or a perf profile taken from a container.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
what="${1:-courier}"

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/tmp"
chmod 1777 "$ctx/rootfs/tmp"

# Copies a binary and the libraries it links (with the loader) into rootfs.
pack() {
    local bin="$1" dest="$2"
    install -D -m 0755 "$bin" "$ctx/rootfs$dest"
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
        mkdir -p "$ctx/rootfs$(dirname "$lib")"
        cp -L "$lib" "$ctx/rootfs$lib"
    done
}

case "$what" in
courier)
    if [ -n "${BIN:-}" ]; then
        # A binary built elsewhere (a test's): packed stripped, its debug
        # information left where it is.
        objcopy --strip-debug --strip-unneeded "$BIN" "$ctx/courier"
    else
        source "$root/scripts/setup.sh"
        cd "$root"
        # PROFILE=bench reuses an optimized build made for benchmarks (thin LTO).
        profile="${PROFILE:-release}"
        cargo build --profile "$profile" -p courier-broker --bin courier
        out="$profile"
        [ "$profile" = bench ] && out=release
        bin="${CARGO_TARGET_DIR:-$root/target}/$out/courier"
        objcopy --only-keep-debug "$bin" "$bin.debug"
        objcopy --strip-debug --strip-unneeded --add-gnu-debuglink="$bin.debug" "$bin" "$ctx/courier"
        echo "build.sh: debug information in $bin.debug" >&2
    fi
    pack "$ctx/courier" /usr/local/bin/courier
    rm "$ctx/courier"
    mkdir -p "$ctx/data"
    cp "$root/deploy/docker/Dockerfile" "$ctx/Dockerfile"
    docker build -q -t "${IMAGE:-courier:latest}" "$ctx"
    ;;
prometheus)
    command -v prometheus >/dev/null || {
        echo "build.sh: installing prometheus (Debian package)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    }
    pack "$(command -v prometheus)" /bin/prometheus
    mkdir -p "$ctx/data"
    cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=65534:65534 data/ /prometheus/
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DOCKERFILE
    docker build -q -t "${IMAGE:-courier-prometheus:latest}" "$ctx"
    ;;
etcd)
    command -v etcd >/dev/null || {
        echo "build.sh: installing etcd-server (Debian package)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
    }
    pack "$(command -v etcd)" /usr/local/bin/etcd
    command -v etcdctl >/dev/null && pack "$(command -v etcdctl)" /usr/local/bin/etcdctl
    mkdir -p "$ctx/data"
    cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=65534:65534 data/ /data/
USER 65534:65534
VOLUME ["/data"]
EXPOSE 2379 2380
ENTRYPOINT ["/usr/local/bin/etcd"]
DOCKERFILE
    docker build -q -t "${IMAGE:-courier-etcd:latest}" "$ctx"
    ;;
haproxy)
    command -v haproxy >/dev/null || {
        echo "build.sh: installing haproxy (Debian package)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null
    }
    pack "$(command -v haproxy)" /usr/local/sbin/haproxy
    cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
USER 65534:65534
ENTRYPOINT ["/usr/local/sbin/haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
DOCKERFILE
    docker build -q -t "${IMAGE:-courier-haproxy:latest}" "$ctx"
    ;;
*)
    echo "usage: $0 [courier|prometheus|etcd|haproxy]" >&2
    exit 2
    ;;
esac
