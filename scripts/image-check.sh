#!/usr/bin/env bash
# image-check.sh — build Helios' CPU container image and prove that it serves.
#
#   scripts/image-check.sh
#
# Builds deploy/docker/Dockerfile with podman, then, with the default model mounted read-only at
# /models, runs `helios serve --tp 3` in a container twice: as the image is, and hardened the
# way the Helm chart runs it (read-only root filesystem, uid 10001, no capabilities, no new
# privileges, a tmpfs /tmp). Each time it waits for /health, asks for a chat completion, stops
# the container with SIGTERM and checks that it exits 0 before the stop timeout. It also builds
# deploy/docker/Dockerfile.fetch-model and fetches the model with it into an empty folder, as an
# init container would. Prints the timings, the answers and the image size; exits non-zero on
# any failure. Re-runnable: base images, layers and the cargo caches are reused.
#
# Environment (all optional):
#   HELIOS_IMAGE            tag of the image built      (default localhost/helios:check)
#   HELIOS_IMAGE_REV        build this git revision (`git archive`) instead of the working tree
#   HELIOS_LOCAL_BASE       1 (default): make the base images here (mmdebstrap + the host's
#                           Rust toolchain), needing only Debian's packages; 0: use the public
#                           ones named in the Dockerfile; auto: 0 when Docker Hub answers
#   HELIOS_REBUILD_BASE     1: remake the local base images even if they are up to date
#   HELIOS_DEBIAN_SOURCES   apt sources file for the local Debian bases (default: the host's
#                           debian.sources when it is for bookworm, else mmdebstrap's default)
#   HELIOS_CHECK_FETCH      0: skip the fetch-model image                    (default 1)
#   HELIOS_INSTALL_DEPS     0: never apt-get install podman & co. when missing (default 1)
#   HELIOS_BUILD_TIMEOUT    seconds the image build may take                 (default 3600)
#   HELIOS_HEALTH_TIMEOUT   seconds a container may take to answer /health   (default 180)
#   HELIOS_TP               workers per replica; must divide the model's 9 heads (default 3)
#   HELIOS_PRUNE            0: keep the untagged images left by earlier runs (default 1)
#
# Needs root (podman's rootful storage, mmdebstrap), bash, curl, python3 (to read JSON), git
# with HELIOS_IMAGE_REV. Installs podman, runc and mmdebstrap from Debian's packages if missing.
# Disk: ~1.3 GB in /var/lib/containers (images), ~1.1 GB in /var/tmp/buildah-cache (the cargo
# caches: crates.io downloads and the target folder).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

IMAGE=${HELIOS_IMAGE:-localhost/helios:check}
FETCH_IMAGE=${IMAGE%:*}-fetch-model:${IMAGE##*:}
BUILDER_IMAGE=${IMAGE%:*}-builder:${IMAGE##*:}
MODEL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
LOCAL_BASE=${HELIOS_LOCAL_BASE:-1}
BUILD_TIMEOUT=${HELIOS_BUILD_TIMEOUT:-3600}
HEALTH_TIMEOUT=${HELIOS_HEALTH_TIMEOUT:-180}
TP=${HELIOS_TP:-3}
# helios drains for at most --shutdown-grace (30 s) after SIGTERM; podman sends SIGKILL after
# this many seconds, so an exit code of 137 means the drain hung.
STOP_TIMEOUT=45
# Containers are named with this prefix and removed on exit, whatever happens.
CNAME=helios-image-check

T0=$EPOCHREALTIME
RESULTS=()
say() { echo "image check: $*"; }
die() {
    echo "image check: FAILED: $*" >&2
    exit 1
}
elapsed() { # start → seconds since, one decimal
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}
result() { RESULTS+=("$(printf '  %-34s %s' "$1" "$2")"); }

# --- prerequisites -------------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || die "run as root (rootful podman; mmdebstrap builds the local base images)"
for tool in curl python3; do
    command -v "$tool" >/dev/null || die "no $tool"
done
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if ((${#need[@]})); then
    [[ ${HELIOS_INSTALL_DEPS:-1} == 1 ]] || die "missing: ${need[*]} (apt-get install ${need[*]})"
    say "installing ${need[*]} (and their helpers) from Debian's packages ..."
    t=$EPOCHREALTIME
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq podman runc mmdebstrap uidmap fuse-overlayfs >/dev/null
    result "install packages" "$(elapsed "$t") s"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/helios-image-check.XXXXXX")
cleanup() {
    local c
    for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep "^$CNAME-" || true); do
        podman rm -f -t 0 "$c" >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- podman's configuration, for this script only --------------------------------------------------
# Written here and named by CONTAINERS_CONF rather than put in /etc: it only works around this
# kind of host, and must not change how the host's other containers run.
#  * runc, not crun: crun refuses a host with hybrid cgroups (v1 controllers and a v2 mount):
#    "cgroups in hybrid mode not supported".
#  * cgroupfs: no systemd to manage the containers' cgroups.
#  * ulimits: podman asks for nofile=1048576 by default; where root lacks CAP_SYS_RESOURCE (as in
#    our sandboxed machines) runc cannot raise a limit above the host's, and every container
#    fails ("error setting rlimit type 7"). nproc must also stay at most kernel.pid_max.
if [[ -z ${CONTAINERS_CONF:-} ]]; then
    nofile=$(ulimit -Hn)
    [[ $nofile == unlimited ]] && nofile=1048576
    nproc=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max)
    [[ $nproc == unlimited || $nproc -gt $pid_max ]] && nproc=$pid_max
    cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf
fi
podman info >/dev/null || die "podman does not work here (see podman info)"
say "disk before: $(df -h --output=avail / | tail -1 | tr -d ' ') free on /"

# --- base images -----------------------------------------------------------------------------------
if [[ $LOCAL_BASE == auto ]]; then
    # Any HTTP answer (401 included) means the registry is there.
    if curl -s -o /dev/null --max-time 10 https://registry-1.docker.io/v2/; then
        LOCAL_BASE=0
    else
        LOCAL_BASE=1
    fi
fi
BUILD_ARGS=() FETCH_ARGS=() FETCH_RUN_ARGS=()
if [[ $LOCAL_BASE == 1 ]]; then
    # No image registry here: make look-alikes of debian:bookworm-slim and rust:1-bookworm from
    # Debian's packages. The Rust toolchain is the host's: Debian's rustc is too old, and the
    # only other way, rustup in the image, downloads a toolchain from outside the registries.
    [[ -n ${HELIOS_TOOLCHAIN_DIR:-} ]] || command -v rustc >/dev/null ||
        die "no rustc here to copy into the builder image (set HELIOS_TOOLCHAIN_DIR)"
    SYSROOT=${HELIOS_TOOLCHAIN_DIR:-$(rustc --print sysroot)}
    [[ -x $SYSROOT/bin/cargo && -x $SYSROOT/bin/rustc ]] ||
        die "no cargo and rustc in $SYSROOT (set HELIOS_TOOLCHAIN_DIR to a rustup toolchain)"
    RUST_VERSION=$("$SYSROOT/bin/rustc" --version | awk '{ print $2 }')
    TOOLCHAIN=$(basename "$SYSROOT")
    RUNTIME_BASE=localhost/helios-base-debian:bookworm
    BUILDER_BASE=localhost/helios-base-rust:$RUST_VERSION-bookworm

    SOURCES=()
    if [[ -n ${HELIOS_DEBIAN_SOURCES:-} ]]; then
        SOURCES=("$HELIOS_DEBIAN_SOURCES")
    elif grep -qs '^Suites:.*\bbookworm\b' /etc/apt/sources.list.d/debian.sources; then
        SOURCES=(/etc/apt/sources.list.d/debian.sources)
    fi
    # Like the official debian:bookworm-slim: merged /usr set up by mmdebstrap's hook rather than
    # by the usrmerge package (which drags in perl, ~70 MB); no docs, man pages or locales; no
    # apt package caches. Both settings stay in the image (/etc/dpkg/dpkg.cfg.d/99mmdebstrap,
    # /etc/apt/apt.conf.d/99mmdebstrap), so that the Dockerfile's `apt-get install`s follow them.
    SLIM=(
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
        --dpkgopt='path-exclude=/usr/share/doc/*'
        --dpkgopt='path-include=/usr/share/doc/*/copyright'
        --dpkgopt='path-exclude=/usr/share/man/*'
        --dpkgopt='path-exclude=/usr/share/info/*'
        --dpkgopt='path-exclude=/usr/share/groff/*'
        --dpkgopt='path-exclude=/usr/share/lintian/*'
        --dpkgopt='path-exclude=/usr/share/locale/*'
        --aptopt='Dir::Cache::pkgcache ""'
        --aptopt='Dir::Cache::srcpkgcache ""'
        --aptopt='Acquire::Languages "none"'
    )
    # Each base image is labelled with a digest of what went into it, so that a changed recipe,
    # toolchain or trust store remakes it and anything else reuses it.
    base_image() { # tag, recipe text, then extra mmdebstrap and podman import options
        local tag=$1 recipe=$2 t=$EPOCHREALTIME digest
        shift 2
        digest=$(printf '%s\n' "$recipe" "${SLIM[@]}" | cat - "${SOURCES[@]}" | sha256sum | cut -c1-16)
        if [[ ${HELIOS_REBUILD_BASE:-0} != 1 &&
            $(podman image inspect --format '{{index .Labels "helios.recipe"}}' "$tag" 2>/dev/null) == "$digest" ]]; then
            return 0
        fi
        local mm=() imp=()
        while (($#)); do
            case $1 in
            --change) imp+=("$1" "$2") && shift 2 ;;
            *) mm+=("$1") && shift ;;
            esac
        done
        say "making $tag with mmdebstrap ..."
        timeout 1200 mmdebstrap --quiet --variant=minbase --mode=root --format=tar \
            --aptopt='Acquire::Retries "3"' "${SLIM[@]}" "${mm[@]}" \
            bookworm "$WORK/rootfs.tar" "${SOURCES[@]}" >"$WORK/mmdebstrap.log" 2>&1 || {
            tail -30 "$WORK/mmdebstrap.log" >&2
            die "mmdebstrap failed for $tag"
        }
        podman import --quiet --change 'CMD ["bash"]' --change "LABEL helios.recipe=$digest" \
            "${imp[@]}" "$WORK/rootfs.tar" "$tag" >/dev/null || die "podman import failed for $tag"
        rm -f "$WORK/rootfs.tar"
        result "base $tag" "$(elapsed "$t") s"
    }
    base_image "$RUNTIME_BASE" minbase

    # Laid out as the official rust image is (cargo in /usr/local/cargo/bin, CARGO_HOME
    # /usr/local/cargo), so that the Dockerfile's cache mounts fit both. The toolchain's docs
    # (~800 MB) stay out. No rustup: cargo and rustc are linked in directly.
    # The host's CA bundle goes in too: this builder fetches crates the way the host does, and
    # where the host reaches crates.io through a TLS-inspecting proxy, only the host's bundle
    # holds that proxy's CA. It stays in the builder: the runtime image has Debian's bundle.
    HOST_CA=/etc/ssl/certs/ca-certificates.crt
    [[ -s $HOST_CA ]] || die "no $HOST_CA on this host"
    cat >"$WORK/builder-hook.sh" <<EOF
#!/bin/sh
set -e
dest="\$1/usr/local/rustup/toolchains/$TOOLCHAIN"
mkdir -p "\$dest" "\$1/usr/local/cargo/bin"
tar -C "$SYSROOT" --exclude=./share/doc -cf - . | tar -C "\$dest" -xf -
for b in "\$dest"/bin/*; do
    ln -sf "../../rustup/toolchains/$TOOLCHAIN/bin/\$(basename "\$b")" "\$1/usr/local/cargo/bin/"
done
cp "$HOST_CA" "\$1/etc/ssl/certs/ca-certificates.crt"
EOF
    chmod +x "$WORK/builder-hook.sh"
    base_image "$BUILDER_BASE" \
        "$(cat "$WORK/builder-hook.sh"; sha256sum "$SYSROOT/bin/rustc" "$HOST_CA")" \
        --include=build-essential,pkg-config,ca-certificates,git \
        --customize-hook="$WORK/builder-hook.sh" \
        --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change "ENV RUST_VERSION=$RUST_VERSION" \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    podman run --rm "$BUILDER_BASE" cargo --version >/dev/null ||
        die "cargo does not run in $BUILDER_BASE (HELIOS_REBUILD_BASE=1 remakes it)"
    BUILD_ARGS=(--build-arg "BUILDER_IMAGE=$BUILDER_BASE" --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE")
    FETCH_ARGS=(--build-arg "RUNTIME_IMAGE=$RUNTIME_BASE")
    # pip in the fetch-model container needs the host's CA bundle for the same reason; lent to
    # that one container, never put in its image.
    FETCH_RUN_ARGS=(-v "$HOST_CA:/run/host-ca.crt:ro" -e PIP_CERT=/run/host-ca.crt)
    say "base images: $BUILDER_BASE, $RUNTIME_BASE (local)"
else
    say "base images: the Dockerfile's defaults (public)"
fi

# --- the build context -------------------------------------------------------------------------------
CONTEXT=$ROOT
if [[ -n ${HELIOS_IMAGE_REV:-} ]]; then
    CONTEXT=$WORK/context
    mkdir -p "$CONTEXT"
    git -C "$ROOT" archive --format=tar "$HELIOS_IMAGE_REV" | tar -C "$CONTEXT" -xf - ||
        die "git archive $HELIOS_IMAGE_REV failed"
    cp "$ROOT/.dockerignore" "$CONTEXT/"
    say "building revision $(git -C "$ROOT" rev-parse --short "$HELIOS_IMAGE_REV")"
fi

# --- the image ---------------------------------------------------------------------------------------
# --network host: the build's RUN steps reach Debian's mirror and crates.io exactly as the host
# does (its resolver, its proxy), with no bridge or NAT set up for the build.
say "podman build -f deploy/docker/Dockerfile -t $IMAGE (clean: ~5 min on 2 cores) ..."
t=$EPOCHREALTIME
timeout "$BUILD_TIMEOUT" podman build --network host --layers \
    -f "$ROOT/deploy/docker/Dockerfile" "${BUILD_ARGS[@]}" -t "$IMAGE" "$CONTEXT" ||
    die "podman build failed (or took more than $BUILD_TIMEOUT s)"
result "build $IMAGE" "$(elapsed "$t") s"
# The builder stage tagged too (from the layer cache: a second), so that the prune at the end
# keeps it: an unchanged tree then rebuilds in seconds instead of recompiling the workspace.
podman build --quiet --network host --layers --target builder \
    -f "$ROOT/deploy/docker/Dockerfile" "${BUILD_ARGS[@]}" -t "$BUILDER_IMAGE" "$CONTEXT" \
    >/dev/null || die "tagging the builder stage failed"
SIZE=$(podman image inspect --format '{{.Size}}' "$IMAGE")
result "image size" "$(awk -v s="$SIZE" 'BEGIN { printf "%.1f MB (%d bytes)", s / 1e6, s }')"

# --- the model -----------------------------------------------------------------------------------------
MODELS=$ROOT/models
if [[ ${HELIOS_CHECK_FETCH:-1} == 1 ]]; then
    say "podman build -f deploy/docker/Dockerfile.fetch-model -t $FETCH_IMAGE ..."
    t=$EPOCHREALTIME
    podman build --quiet --network host --layers -f "$ROOT/deploy/docker/Dockerfile.fetch-model" \
        "${FETCH_ARGS[@]}" -t "$FETCH_IMAGE" \
        "$CONTEXT" >/dev/null || die "building the fetch-model image failed"
    result "build fetch-model image" "$(elapsed "$t") s"
    # As an init container would: uid 10001, read-only root, an empty volume at /models.
    mkdir -p "$WORK/models"
    chown 10001:10001 "$WORK/models"
    say "fetching the model with $FETCH_IMAGE into an empty folder ..."
    t=$EPOCHREALTIME
    timeout 900 podman run --rm --name "$CNAME-fetch" --network host --read-only \
        --read-only-tmpfs=false --tmpfs /tmp:rw,size=512m,mode=1777 --user 10001:10001 \
        --cap-drop ALL --security-opt no-new-privileges -v "$WORK/models:/models" \
        "${FETCH_RUN_ARGS[@]}" "$FETCH_IMAGE" >"$WORK/fetch.out" || die "the fetch-model container failed"
    [[ $(cat "$WORK/fetch.out") == /models/$MODEL_NAME ]] ||
        die "the fetch-model container printed '$(cat "$WORK/fetch.out")'"
    [[ $(head -c 4 "$WORK/models/$MODEL_NAME") == GGUF ]] || die "the fetched model is no GGUF file"
    result "fetch model (init container)" "$(elapsed "$t") s, $(du -m "$WORK/models/$MODEL_NAME" | cut -f1) MB"
    if [[ ! -s $MODELS/$MODEL_NAME ]]; then
        mkdir -p "$MODELS"
        cp "$WORK/models/$MODEL_NAME" "$MODELS/$MODEL_NAME.partial.$$"
        mv -f "$MODELS/$MODEL_NAME.partial.$$" "$MODELS/$MODEL_NAME"
    elif ! cmp -s "$WORK/models/$MODEL_NAME" "$MODELS/$MODEL_NAME"; then
        say "note: the fetched model differs from models/$MODEL_NAME"
    fi
    rm -rf "$WORK/models"
fi
[[ -s $MODELS/$MODEL_NAME ]] || "$ROOT/scripts/fetch-model.sh" >/dev/null ||
    die "no models/$MODEL_NAME and scripts/fetch-model.sh could not fetch it"

# --- serving from the container -----------------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
json() { # python expression over `d` (the JSON document on stdin)
    python3 -c "import json, sys; d = json.load(sys.stdin); print($1)"
}

serve_check() { # label, then extra podman run options
    local label=$1 name=$CNAME-$1
    shift
    local port t ready status model answer stop_s code
    port=$(free_port)
    podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
    say "[$label] podman run ... $IMAGE serve --tp $TP (HTTP on 127.0.0.1:$port)"
    t=$EPOCHREALTIME
    # The HTTP port is published on loopback only.
    podman run -d --name "$name" -p "127.0.0.1:$port:8080" -v "$MODELS:/models:ro" "$@" \
        "$IMAGE" serve --tp "$TP" --model "/models/$MODEL_NAME" --port 50051 --http-port 8080 \
        >/dev/null || die "[$label] podman run failed"
    while :; do
        status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
            "http://127.0.0.1:$port/health" || true)
        [[ $status == 200 ]] && break
        if [[ $(podman inspect --format '{{.State.Running}}' "$name") != true ]]; then
            podman logs --tail 40 "$name" >&2 || true
            die "[$label] the container exited before /health answered 200"
        fi
        if awk -v a="$t" -v b="$EPOCHREALTIME" -v m="$HEALTH_TIMEOUT" 'BEGIN { exit !(b - a > m) }'; then
            podman logs --tail 40 "$name" >&2 || true
            die "[$label] no 200 from /health within $HEALTH_TIMEOUT s (last: $status)"
        fi
        sleep 0.5
    done
    ready=$(elapsed "$t")

    model=$(curl -sf --max-time 10 "http://127.0.0.1:$port/v1/models" | json 'd["data"][0]["id"]') ||
        die "[$label] GET /v1/models failed"
    answer=$(curl -sf --max-time 120 -H 'content-type: application/json' \
        -d "{\"model\": \"$model\", \"max_tokens\": 16, \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}" \
        "http://127.0.0.1:$port/v1/chat/completions" |
        json 'json.dumps(d["choices"][0]["message"]["content"], ensure_ascii=False)') ||
        die "[$label] POST /v1/chat/completions failed"
    [[ -n $(json 'd.strip()' <<<"$answer") ]] || die "[$label] the answer has no text: $answer"

    # helios must be PID 1 (it gets the SIGTERM) and run as uid 10001, its workers must be its
    # children, and there must be no zombies.
    local procs
    procs=$(podman exec "$name" sh -c \
        'for s in /proc/[0-9]*/stat; do read -r pid comm state ppid rest < "$s" && echo "$pid $comm $state $ppid"; done') ||
        die "[$label] podman exec failed"
    [[ $(awk '$1 == 1 { print $2 }' <<<"$procs") == "(helios)" ]] ||
        die "[$label] PID 1 is not helios: $procs"
    [[ $(podman exec "$name" awk '$1 == "Uid:" { print $2 }' /proc/1/status) == 10001 ]] ||
        die "[$label] helios does not run as uid 10001"
    [[ $(awk '$2 == "(helios-worker)" && $4 == 1' <<<"$procs" | wc -l) == "$TP" ]] ||
        die "[$label] expected $TP helios-worker children of PID 1: $procs"
    ! awk '{ print $3 }' <<<"$procs" | grep -q Z || die "[$label] zombie processes: $procs"

    t=$EPOCHREALTIME
    podman stop -t "$STOP_TIMEOUT" "$name" >/dev/null || die "[$label] podman stop failed"
    stop_s=$(elapsed "$t")
    code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
    if [[ $code != 0 ]]; then
        podman logs --tail 40 "$name" >&2 || true
        die "[$label] exit code $code after SIGTERM (137: it was killed, the drain hung)"
    fi
    podman rm "$name" >/dev/null
    say "[$label] model $model answered $answer"
    result "[$label] run to /health 200" "$ready s"
    result "[$label] answer" "$answer"
    result "[$label] stop (SIGTERM)" "exit $code after $stop_s s"
}

serve_check default
# As the Helm chart runs it. podman's --read-only adds tmpfs mounts of its own, which Kubernetes'
# readOnlyRootFilesystem does not: --read-only-tmpfs=false, and /tmp and /dev/shm given explicitly.
serve_check hardened --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,size=64m,mode=1777 \
    --shm-size 64m --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges

# --- tidy up -------------------------------------------------------------------------------------------
if [[ ${HELIOS_PRUNE:-1} == 1 ]]; then
    # Untagged images: those that earlier runs' tags pointed to, and their intermediate layers.
    podman image prune -f >/dev/null || true
fi
say "disk after: $(df -h --output=avail / | tail -1 | tr -d ' ') free on /"

echo "image check: results"
for r in "${RESULTS[@]}"; do echo "$r"; done
printf '  %-34s %s s\n' total "$(elapsed "$T0")"
echo "image check: OK"
