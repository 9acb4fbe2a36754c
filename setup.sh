#!/usr/bin/env bash
# Make .venv and install what the proxy needs; with --dev, also everything the tests and the
# benchmark need (the end-to-end tier pulls torch: 754 MB installed, and a minute or two).
# Safe to run again: it reuses .venv and pip skips what is already installed.
set -euo pipefail

usage() {
    echo "usage: ./setup.sh [--dev]"
    echo "  (no option)  .venv with the proxy's runtime requirements (aiohttp, prometheus_client) and its"
    echo "               optional speedups (orjson, uvloop; PROXY_NO_SPEEDUPS=1 turns them off at run time)"
    echo "  --dev        also the test and benchmark requirements, the end-to-end tier's included,"
    echo "               .venv-gateway with the LiteLLM gateway, and .venv-clients with the RAG frameworks'"
    echo "               reranker clients"
}

dev=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "setup.sh: '$python' not found; install Python 3.10 or newer, or set PYTHON=/path/to/python3" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup.sh: Python 3.10 or newer is needed; '$python' is $("$python" --version 2>&1)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $("$python" --version 2>&1)"
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check --quiet)

echo "==> installing runtime requirements (requirements.txt)"
"${pip[@]}" -r requirements.txt
# Optional: the proxy runs without them, faster with them. Always installed, so that the tests cover
# both ways (the suite runs once more with PROXY_NO_SPEEDUPS=1).
echo "==> installing the optional speedups (requirements-speedups.txt: orjson, uvloop)"
"${pip[@]}" -r requirements-speedups.txt

if [ "$dev" = 1 ]; then
    echo "==> installing test and benchmark requirements (requirements-dev.txt)"
    "${pip[@]}" -r requirements-dev.txt
    echo "==> installing the end-to-end tier (requirements-e2e.txt: torch CPU, infinity-emb, litellm, cohere)"
    # torch first and on its own, pinned: nothing else may pick a (multi-GB, CUDA) torch for us.
    "${pip[@]}" "$(grep -E '^torch==' requirements-e2e.txt)"
    "${pip[@]}" -r requirements-e2e.txt
    echo "==> installing the fidelity tier's reference (requirements-fidelity.txt: mixedbread's mxbai-rerank, --no-deps)"
    "${pip[@]}" --no-deps -r requirements-fidelity.txt
    # litellm[proxy] needs uvicorn>=0.33 and infinity-emb[server] needs uvicorn<0.33: the gateway gets its own venv.
    echo "==> installing the LiteLLM gateway into .venv-gateway (requirements-gateway.txt: litellm[proxy])"
    if [ ! -x .venv-gateway/bin/python ]; then
        "$python" -m venv .venv-gateway
    fi
    .venv-gateway/bin/python -m pip install --disable-pip-version-check --quiet -r requirements-gateway.txt
    # The RAG frameworks' reranker clients (Haystack, LlamaIndex, LangChain) get a venv of their own,
    # because langchain-cohere 0.6.0 needs cohere<6 while the tests in .venv use the Cohere SDK 7.
    # test_clients.py runs them with .venv-clients/bin/python. None of them pulls torch or a model:
    # about 470 MB; 44 s to 4 minutes the first time (measured), seconds after that.
    if [ ! -x .venv-clients/bin/python ]; then
        echo "==> creating .venv-clients for the framework clients"
        "$python" -m venv .venv-clients
    fi
    echo "==> installing the framework clients into .venv-clients (requirements-clients.txt)"
    .venv-clients/bin/python -m pip install --disable-pip-version-check --quiet -r requirements-clients.txt
fi

echo "==> done. Run the proxy:  .venv/bin/python proxy-classifier.py --infinity-url http://localhost:7997/v1"
if [ "$dev" = 1 ]; then
    echo "    Run the tests:      .venv/bin/python -m pytest"
fi
