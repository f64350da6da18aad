#!/usr/bin/env bash
# Container stage of CI: build the cpu image and run a real participant + group analysis inside it.
#
#   scripts/ci/container-test.sh            # build (no cache) from a debootstrap base, run, compare
#   QSMPREP_IMAGE=qsmprep:test scripts/ci/container-test.sh --no-build   # test an image built elsewhere
#
# Steps (each timed; a summary table is printed at the end):
#   1. dockerd: use $DOCKER_HOST when it answers, else start a private daemon (scripts/ci/dockerd.sh,
#      installing docker.io as root) and stop it on exit;
#   2. base image: debootstrap + docker import (scripts/ci/base-image.sh), unless QSMPREP_CPU_BASE_IMAGE
#      names one (e.g. debian:bookworm-slim where a registry is reachable);
#   3. image: `docker build --no-cache --target cpu` (a missing install step cannot hide in a cache);
#      CI-only inputs (the host CA bundle, a local CPU torch wheel) go to .ci/image/ for the build stage
#      only and are removed afterwards; the test checks they are not in the image;
#   4. data: qsmprep-simulate, two participants on the 2 mm grid (host python);
#   5. container: participant then group level with `--read-only --tmpfs /tmp --network none`, as a uid
#      that is not the image's (4242), input mounted read-only; `docker diff` must show no write outside
#      /out, /work and /tmp;
#   6. host: the same participant + group run with the host's qsmprep;
#   7. checks: bids-validator-deno on the container's output (derivative dataset), and the container's
#      output equal to the host's (same files; maps equal within float tolerance).
#
# Environment: QSMPREP_CI_DIR (scratch, default /tmp/qsmprep-ci-container), QSMPREP_IMAGE (tag, default
# qsmprep:ci-cpu), QSMPREP_VERSION (default: the installed qsmprep's version), QSMPREP_RUN_UID (4242),
# PYTHON (python3). Exit status: 0 passed, 1 failed, 3 docker cannot be started here (not root / no
# docker): callers outside CI may treat 3 as "skipped"; in CI it is a failure like any other.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
CI_DIR=${QSMPREP_CI_DIR:-/tmp/qsmprep-ci-container}
IMAGE=${QSMPREP_IMAGE:-qsmprep:ci-cpu}
RUN_UID=${QSMPREP_RUN_UID:-4242}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
BUILD=1
[ "${1:-}" = --no-build ] && BUILD=0

log() { printf '[container-test] %s\n' "$*" >&2; }
STAGES=()
stage() {  # stage NAME COMMAND...: run and time one stage
    local name=$1 t0 rc; shift
    log "=== $name"
    t0=$(date +%s.%N)
    set +e; "$@"; rc=$?; set -e
    local dt; dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    STAGES+=("$(printf '%-44s %8s s  %s' "$name" "$dt" "$([ $rc = 0 ] && echo ok || echo "FAILED ($rc)")")")
    log "=== $name: $dt s (exit $rc)"
    return $rc
}
summary() {
    printf '\n[container-test] stage times\n' >&2
    for s in "${STAGES[@]}"; do printf '  %s\n' "$s" >&2; done
}

STARTED_DOCKERD=0
cleanup() {
    rc=$?
    rm -rf "$REPO/.ci/image/ca.crt" "$REPO/.ci/image/wheels"
    summary
    if [ "$STARTED_DOCKERD" = 1 ]; then scripts/ci/dockerd.sh stop || true; fi
    exit $rc
}
trap cleanup EXIT

# --- 1. docker ---------------------------------------------------------------------------------------
start_docker() {
    if [ -n "${DOCKER_HOST:-}" ] || [ -S /var/run/docker.sock ]; then
        if docker info >/dev/null 2>&1; then log "using the running docker daemon"; return 0; fi
    fi
    if [ "$(id -u)" != 0 ] && ! command -v dockerd >/dev/null; then
        log "SKIP: no docker daemon answers and docker.io cannot be installed (not root)"; return 3
    fi
    local env; env=$(scripts/ci/dockerd.sh start) || return 3
    eval "$env"; export DOCKER_HOST; STARTED_DOCKERD=1
}
stage "dockerd start" start_docker || exit $?
docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}' >&2

VERSION=${QSMPREP_VERSION:-$("$PYTHON" -c 'import qsmprep; print(qsmprep.__version__)')}
log "qsmprep version for the image: $VERSION"

# --- 2./3. image ---------------------------------------------------------------------------------------
prepare_context() {
    mkdir -p .ci/image/wheels
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then cp /etc/ssl/certs/ca-certificates.crt .ci/image/ca.crt; fi
    # a CPU torch wheel from pip's find-links folders (this CI machine has one; elsewhere the build uses
    # the PyTorch CPU index)
    local d w
    for d in ${QSMPREP_TORCH_WHEEL_DIR:-} $("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"); do
        for w in "$d"/torch-"$TORCH_VERSION"+cpu-*.whl; do
            [ -f "$w" ] && { cp "$w" .ci/image/wheels/ && log "CPU torch wheel for the build: $w"; return 0; }
        done
    done
    log "no local CPU torch wheel: the build installs torch from the PyTorch CPU index"
}
build_image() {
    DOCKER_BUILDKIT=0 docker build --no-cache --force-rm --network host --target cpu \
        --build-arg CPU_BASE_IMAGE="$BASE" --build-arg VERSION="$VERSION" \
        --build-arg VCS_REF="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -t "$IMAGE" . > "$CI_DIR/build.log" 2>&1 || { tail -40 "$CI_DIR/build.log" >&2; return 1; }
    grep -E '^(qsmprep [^ ]+ torch|Successfully)' "$CI_DIR/build.log" >&2 || true
    docker image inspect "$IMAGE" --format 'image {{.Id}}: {{.Size}} bytes' >&2
}
check_image() {
    local ca_sum; ca_sum=$(sha256sum < /etc/ssl/certs/ca-certificates.crt | cut -d' ' -f1)
    # not in the image: /tmp/ci, a copy of the CI CA bundle, the torch wheel
    docker run --rm --network none --entrypoint /bin/sh "$IMAGE" -c "
        test ! -e /tmp/ci || { echo 'FAIL: /tmp/ci is in the image'; exit 1; }
        sz=\$(stat -c %s /etc/ssl/certs/ca-certificates.crt 2>/dev/null || echo 0)
        for f in \$(find / -xdev -type f \\( -name '*.crt' -o -name '*.pem' -o -name 'torch-*.whl' \\) 2>/dev/null); do
            case \$f in *.whl) echo \"FAIL: wheel \$f in the image\"; exit 1;; esac
            [ \"\$(sha256sum < \$f | cut -d' ' -f1)\" = $ca_sum ] && { echo \"FAIL: CI CA bundle copied to \$f\"; exit 1; }
        done
        test \"\$(id -u)\" = 1000 && test \"\$(id -un)\" = qsmprep || { echo 'FAIL: image user is not qsmprep (1000)'; exit 1; }
        echo 'image: no CI-only input inside; runs as' \$(id -un) \$(id -u)
    " >&2
    local v; v=$(docker run --rm --read-only --tmpfs /tmp --network none -u "$RUN_UID:$RUN_UID" "$IMAGE" --version)
    log "docker run $IMAGE --version: $v"
    case "$v" in *"$VERSION"*) ;; *) log "FAIL: image reports '$v', expected $VERSION"; return 1 ;; esac
}
mkdir -p "$CI_DIR"
if [ "$BUILD" = 1 ]; then
    BASE=${QSMPREP_CPU_BASE_IMAGE:-}
    if [ -z "$BASE" ]; then
        BASE=qsmprep-ci/bookworm-base:latest
        stage "base image (debootstrap + import)" scripts/ci/base-image.sh "$BASE"
    fi
    prepare_context
    stage "image build (cpu target, --no-cache)" build_image
    rm -rf .ci/image/ca.crt .ci/image/wheels
fi
stage "image checks (no CI inputs, user, version)" check_image

# --- 4. data ----------------------------------------------------------------------------------------------
rm -rf "$CI_DIR/bids" "$CI_DIR/ctr" "$CI_DIR/host"
stage "simulate two participants (2 mm)" \
    "$PYTHON" -m qsmprep.simulate.cli "$CI_DIR/bids" --subjects 01 02 --small --no-derivatives --seed 0
chmod -R a+rX "$CI_DIR/bids"
ARGS=(--participant-label 01 02 --bgremove vsharp --inversion rts --nprocs 2 --omp-nthreads 1)

# --- 5. container run --------------------------------------------------------------------------------------
mkdir -p "$CI_DIR/ctr/out" "$CI_DIR/ctr/work"
if [ "$(id -u)" = 0 ]; then chown -R "$RUN_UID:$RUN_UID" "$CI_DIR/ctr"; else chmod 777 "$CI_DIR/ctr/out" "$CI_DIR/ctr/work"; fi
ctr_run() {  # ctr_run NAME LEVEL [ARGS...]
    local name=$1 level=$2; shift 2
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker run --name "$name" --read-only --tmpfs /tmp --network none -u "$RUN_UID:$RUN_UID" \
        -v "$CI_DIR/bids:/data:ro" -v "$CI_DIR/ctr/out:/out" -v "$CI_DIR/ctr/work:/work" \
        "$IMAGE" /data /out "$level" -w /work "$@" > "$CI_DIR/ctr/$level.log" 2>&1
    local rc=$?
    tail -3 "$CI_DIR/ctr/$level.log" >&2
    # writes outside the mounts would show in the container's own layer
    local changes; changes=$(docker diff "$name" | grep -vE '^[AC] /(out|work|tmp|data)$' || true)
    docker rm "$name" >/dev/null
    if [ -n "$changes" ]; then log "FAIL: the container wrote outside /out, /work, /tmp:"; echo "$changes" >&2; return 1; fi
    [ $rc = 0 ] || { log "FAIL: $level exited $rc"; tail -30 "$CI_DIR/ctr/$level.log" >&2; return 1; }
}
stage "container participant (2 subjects, uid $RUN_UID, read-only)" ctr_run qsmprep-ci-participant participant "${ARGS[@]}"
stage "container group" ctr_run qsmprep-ci-group group
owner=$(find "$CI_DIR/ctr/out" ! -user "$RUN_UID" | head -3)
[ -z "$owner" ] || { log "FAIL: files not owned by uid $RUN_UID: $owner"; exit 1; }

# --- 6. host run ---------------------------------------------------------------------------------------------
host_run() {
    local level=$1; shift
    "$PYTHON" -m qsmprep.cli.run "$CI_DIR/bids" "$CI_DIR/host/out" "$level" -w "$CI_DIR/host/work" "$@" \
        > "$CI_DIR/host/$level.log" 2>&1 || { tail -30 "$CI_DIR/host/$level.log" >&2; return 1; }
    tail -2 "$CI_DIR/host/$level.log" >&2
}
mkdir -p "$CI_DIR/host"
stage "host participant (2 subjects)" host_run participant "${ARGS[@]}"
stage "host group" host_run group

# --- 7. checks -------------------------------------------------------------------------------------------------
validate() {
    local exe; exe=$(command -v bids-validator-deno) || { log "FAIL: bids-validator-deno is not installed"; return 1; }
    "$exe" "$CI_DIR/ctr/out" --datasetTypes derivative --format json --no-color > "$CI_DIR/validator.json" 2>"$CI_DIR/validator.err"
    local rc=$?
    "$PYTHON" - "$CI_DIR/validator.json" "$rc" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
errors = [(i["code"], i.get("location")) for i in report["issues"]["issues"] if i["severity"] == "error"]
s = report["summary"]
print(f"[container-test] bids-validator-deno: exit {sys.argv[2]}, {len(errors)} errors, subjects {sorted(s['subjects'])}, "
      f"{s['totalFiles']} files", file=sys.stderr)
for e in errors[:20]:
    print("  ", e, file=sys.stderr)
sys.exit(1 if errors or sys.argv[2] != "0" or sorted(s["subjects"]) != ["01", "02"] else 0)
PY
}
stage "bids-validator-deno (container output)" validate
stage "compare container vs host outputs" \
    "$PYTHON" scripts/ci/compare_derivatives.py "$CI_DIR/ctr/out" "$CI_DIR/host/out" --rtol 1e-4 --atol 1e-6
log "PASSED"
