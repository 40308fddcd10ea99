#!/usr/bin/env bash
# Builds the CPU container image of badit-serve with podman and smoke-tests it (`make image-test`).
# Not part of `make test`/CI: it needs root, apt, podman and a few minutes.
#
# From a clean Debian bookworm machine (as root, network to PyPI and the Debian mirrors only):
#   1. installs podman, runc, debootstrap if missing (apt-get);
#   2. writes /etc/containers/containers.conf if missing (no default ulimits, cgroupfs: see
#      ../shared/docs/containers.md); every podman build/run here uses `--runtime runc`;
#   3. makes the local base image localhost/debian-python:bookworm if missing (debootstrap minbase + python3;
#      no registry can be pulled from here);
#   4. builds the image (torch 2.13.0+cpu from the local wheel folder /opt/wheels, everything else from PyPI);
#   5. makes a tiny trained export of a random 2-layer Llama with the default tokenizer (or uses
#      IMAGE_TEST_EXPORT=DIR, e.g. exports/quickstart);
#   6. runs the container on 127.0.0.1:PORT with the export mounted read-only at /model, waits for /health,
#      checks one chat completion (openai client from .venv), the image's HEALTHCHECK, the non-root user and a
#      badit_expert_tokens_total line on /metrics; the container is always removed at the end.
# Prints the build time, the image size and the start-to-healthy time.
#
# Environment: IMAGE (default localhost/badit-serve:cpu), BASE_IMAGE (localhost/debian-python:bookworm),
# PORT (18000), IMAGE_TEST_EXPORT (a tiny export made here), WHEELS (/opt/wheels), CA_BUNDLE (host CA bundle),
# HEALTH_TIMEOUT (600 s), SERVE_ARGS (passed to the container as BADIT_SERVE_ARGS, default empty), SHM_SIZE (1g),
# NO_BUILD=1 (reuse the image as it is).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/badit-serve:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
PORT=${PORT:-18000}
WHEELS=${WHEELS:-/opt/wheels}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
SERVE_ARGS=${SERVE_ARGS:-}
SHM_SIZE=${SHM_SIZE:-1g}
PY=${PY:-.venv/bin/python}
CONTAINER=badit-image-test-$$
RUNTIME=(--runtime runc)

say() { printf '\n[image-test] %s\n' "$*"; }
die() { printf '\n[image-test] FAILED: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d /tmp/badit-image-test.XXXXXX)
cleanup() {
  status=$?
  if command -v podman >/dev/null && podman container exists "$CONTAINER" 2>/dev/null; then
    if [ "$status" -ne 0 ]; then
      echo "---- last container log lines ----" >&2
      podman logs --tail 60 "$CONTAINER" >&2 2>&1 || true
    fi
    podman rm -f -t 10 "$CONTAINER" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$PY" ] || die "$PY not found: run \`make setup\` first"

# 1. tools ---------------------------------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (apt-get)"
  [ "$(id -u)" -eq 0 ] || die "installing packages needs root"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap
fi

# 2. podman configuration --------------------------------------------------------------------------------------
if [ ! -f /etc/containers/containers.conf ]; then
  say "writing /etc/containers/containers.conf (default_ulimits = [], cgroup_manager = cgroupfs)"
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\n' > /etc/containers/containers.conf
fi

# 3. local base image ------------------------------------------------------------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
  say "making the base image $BASE_IMAGE (debootstrap bookworm minbase + python3)"
  rootfs="$work/rootfs"
  t0=$SECONDS
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    http://deb.debian.org/debian > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; die "debootstrap"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  echo "base image made in $((SECONDS - t0)) s"
fi

# 4. build -----------------------------------------------------------------------------------------------------
build_s=-
if [ "${NO_BUILD:-0}" != 1 ] || ! podman image exists "$IMAGE"; then
  [ -f "$WHEELS/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl" ] \
    || die "no torch 2.13.0+cpu wheel in $WHEELS (set WHEELS, or build with the public TORCH_INDEX_URL)"
  say "building $IMAGE from $BASE_IMAGE"
  t0=$SECONDS
  # --format docker keeps the HEALTHCHECK (the OCI format has none). torch comes from the mounted wheel
  # folder (TORCH_INDEX_URL empty: download.pytorch.org is not reachable here); pip verifies PyPI's
  # certificate with the host's CA bundle.
  podman build "${RUNTIME[@]}" --network host --format docker \
    -v "$WHEELS:/wheels:ro" -v "$CA_BUNDLE:/host-ca.crt:ro" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL= \
    --build-arg BUILD_PIP_ARGS="--find-links /wheels --cert /host-ca.crt" \
    -t "$IMAGE" .
  build_s=$((SECONDS - t0))
  echo "build time: ${build_s} s"
fi
size_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
podman images --filter reference="$IMAGE"

# 5. export ----------------------------------------------------------------------------------------------------
if [ -n "${IMAGE_TEST_EXPORT:-}" ]; then
  export_dir=$(realpath "$IMAGE_TEST_EXPORT")
  say "using the export $export_dir"
else
  say "making a tiny export (random 2-layer Llama, default tokenizer, a few training steps)"
  export_dir="$work/export"
  "$PY" - "$work/tiny-llama" "$export_dir" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, ".")  # the repository's tests package (tiny models and exports)
from tests.badit_exports import make_export
from tests.tiny_models import build_tiny_model
from training.model_store import resolve_model

model_dir = build_tiny_model("llama", resolve_model("smollm2-135m-instruct"), Path(sys.argv[1]))
print(make_export(model_dir, Path(sys.argv[2]), labelled=True))
EOF
fi
[ -f "$export_dir/badit_manifest.json" ] || die "$export_dir is not a Badit export"
# The container runs as a non-root user (uid 1000): the mounted export must be readable by others. Exports
# are written 0755/0644; ones written before that (safetensors >= 0.8 makes the weights 0600) need a chmod.
unreadable=$(find "$export_dir" ! -perm -o=r -print -quit)
[ -z "$unreadable" ] || die "$unreadable is not readable by other users: chmod -R a+rX $export_dir"

# 6. run and check ---------------------------------------------------------------------------------------------
say "starting the container on 127.0.0.1:$PORT"
t0=$(date +%s.%N)
podman run "${RUNTIME[@]}" -d --name "$CONTAINER" -p "127.0.0.1:$PORT:8000" --shm-size "$SHM_SIZE" \
  -v "$export_dir:/model:ro" -e BADIT_API_KEY=image-test-key -e BADIT_SERVE_ARGS="$SERVE_ARGS" \
  "$IMAGE" > /dev/null 2> "$work/run.err" || { cat "$work/run.err" >&2; die "podman run"; }
# Without systemd podman cannot schedule the periodic HEALTHCHECK (it logs two errors saying so); it is run
# once by hand below with `podman healthcheck run`.
grep -v "systemd connection" "$work/run.err" >&2 || true
healthy=""
while :; do
  if "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
    healthy=$(date +%s.%N); break
  fi
  [ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] || die "the container exited"
  elapsed=$(awk "BEGIN {print int($(date +%s.%N) - $t0)}")
  [ "$elapsed" -lt "$HEALTH_TIMEOUT" ] || die "not healthy after $HEALTH_TIMEOUT s"
  sleep 1
done
healthy_s=$(awk "BEGIN {printf \"%.1f\", $healthy - $t0}")
echo "healthy after ${healthy_s} s"

say "checks"
podman healthcheck run "$CONTAINER" >/dev/null && echo "HEALTHCHECK: healthy"
uid=$(podman exec "$CONTAINER" id -u)
[ "$uid" != 0 ] || die "the server runs as root"
echo "server user: $(podman exec "$CONTAINER" id -un) (uid $uid)"
"$PY" - "$PORT" <<'EOF'
import json
import re
import sys
import time
import urllib.request

import openai

port = sys.argv[1]
base = f"http://127.0.0.1:{port}"
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    sys.exit("a wrong API key was accepted (BADIT_API_KEY not applied)")
except openai.AuthenticationError:
    print("wrong API key: 401 as expected (BADIT_API_KEY applied)")
client = openai.OpenAI(base_url=f"{base}/v1", api_key="image-test-key", max_retries=0)
model = client.models.list().data[0].id
reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name three primary colours."}], max_tokens=24, temperature=0
)
print(f"chat ({model}): {reply.choices[0].message.content!r} usage={reply.usage.prompt_tokens}+{reply.usage.completion_tokens}")
assert reply.usage.completion_tokens > 0
req = urllib.request.Request(f"{base}/v1/badit/experts", headers={"Authorization": "Bearer image-test-key"})
experts = json.loads(urllib.request.urlopen(req, timeout=10).read())
top_k = experts["top_k"]
expected = top_k * (reply.usage.prompt_tokens + reply.usage.completion_tokens - 1)  # per layer (docs/SERVING.md)
per_layer: dict[str, float] = {}
for _ in range(10):  # the worker's collector flushes the counters every second
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    per_layer = {}
    for line in metrics.splitlines():
        if line.startswith("badit_expert_tokens_total{"):
            layer = re.search(r'layer="([^"]*)"', line).group(1)
            per_layer[layer] = per_layer.get(layer, 0.0) + float(line.rsplit(" ", 1)[1])
    if per_layer and all(v == expected for v in per_layer.values()):
        break
    time.sleep(1)
assert per_layer, "no badit_expert_tokens_total line on /metrics"
assert all(v == expected for v in per_layer.values()), f"per-layer counts {per_layer}, expected {expected} each"
print(f"/metrics: badit_expert_tokens_total sums to top_k x (prompt + completion - 1) = {expected:.0f} in each of "
      f"{len(per_layer)} layers")
EOF

say "passed"
printf '  image            %s (%s bytes = %.2f GB)\n' "$IMAGE" "$size_bytes" "$(awk "BEGIN {print $size_bytes / 1e9}")"
printf '  build time       %s s\n' "$build_s"
printf '  start-to-healthy %s s\n' "$healthy_s"
