"""Container tier: the Docker image and the compose stack, built and run for real with podman.

`scripts/container-setup.sh` (run as root; CI's `.ci/run` runs it) prepares the engine: podman with runc, a stand-in
for `python:3.12-slim` built with debootstrap (no registry can be reached here), podman-compose in .venv, and a
stand-in for the LiteLLM gateway image the compose file names. Infinity's own image cannot be pulled either: its
place is taken by the test suite's fake (conftest.FakeInfinity, `tests/fake-infinity/`), whose scores are a hash of
each prompt, so every score a test reads is checked against the one it must be.

The image is built from the working tree. Every container, network, volume and image a test makes has a name unique
to this run and is removed afterwards, pass or fail. The compose stack publishes fixed ports (8002, 7997, 4000): its
tests take a lock so that two runs on one machine take turns.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import LOCAL_HTTP, ROOT, SERVED_MODEL, free_port, hashed_probability, proxy, strict_environment
from tests.helpers import http_json

pytestmark = pytest.mark.container

BASE_IMAGE = "python:3.12-slim"
FAKE_INFINITY_IMAGE = "localhost/rerank-proxy-fake-infinity"
RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
PROJECT = f"rerankct{RUN_ID.replace('-', '')}"  # compose project: lowercase letters and digits
COMPOSE_FILES = ("docker-compose.yaml", "tests/compose.fake-infinity.yaml")
COMPOSE_LOCK = "/tmp/rerank-proxy-container-tier-compose.lock"
LITELLM_KEY = f"sk-container-tier-{uuid.uuid4().hex}"  # LiteLLM wants a long master key starting with sk-
IMAGE_USER, IMAGE_UID = "reranker", 10001
GRACE_SECONDS = 65  # the compose file's stop_grace_period
BUILD_SECONDS = 600.0  # a first build installs aiohttp from the registry; a cached one takes seconds
START_SECONDS = 90.0
CALL_SECONDS = 60.0
DOCUMENTS = ["Paris is the capital of France.", "The weather in Tokyo is sunny.", "Berlin is in Germany.", "cats"]
QUERY = "what is the capital of france"


# --------------------------------------------------------------------------------------------
# The engine: podman, or a skip that says why (a failure where CI demands every tier)
# --------------------------------------------------------------------------------------------


def podman(*args: str, timeout: float = CALL_SECONDS, check: bool = True, **kwargs: Any) -> str:
    """Run `podman ARGS`; its standard output, or an error carrying its standard error."""
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def why_podman_cannot_run() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed"
    try:
        info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=CALL_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman cannot run here ({exc})"
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-500:]}"
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], timeout=CALL_SECONDS).returncode != 0:
        return f"there is no {BASE_IMAGE} image (nor its stand-in)"
    if importlib.util.find_spec("podman_compose") is None:
        return "podman-compose is not installed in this Python"
    return None


@pytest.fixture(scope="module", autouse=True)
def engine() -> None:
    reason = why_podman_cannot_run()
    if reason:
        message = f"the container tier cannot run: {reason}; run scripts/container-setup.sh as root"
        if strict_environment():
            pytest.fail(f"{message}; PROXY_TESTS_REQUIRE_ALL=1 does not allow skipping it")
        pytest.skip(message)


def build(tag: str, containerfile: str) -> None:
    """Build from the working tree as a user's `docker build` would, with the HEALTHCHECK kept (podman's default OCI
    format drops it), never pulling (the base is the local stand-in), pip reaching the registry as the host does."""
    podman("build", "--quiet", "--format", "docker", "--network", "host", "--pull=never",
           "-f", containerfile, "-t", tag, str(ROOT), timeout=BUILD_SECONDS)


@pytest.fixture(scope="module")
def proxy_image(engine: None) -> Iterator[str]:
    tag = f"localhost/rerank-proxy-test:{RUN_ID}"
    build(tag, "Dockerfile")
    yield tag
    podman("rmi", "--force", tag, check=False)


@pytest.fixture(scope="module")
def fake_infinity_image(engine: None) -> str:
    # Rebuilt from the working tree's conftest.py (cached layers: seconds). The setup script built it too; it stays,
    # as the compose override names it.
    build(FAKE_INFINITY_IMAGE, "tests/fake-infinity/Containerfile")
    return FAKE_INFINITY_IMAGE


# --------------------------------------------------------------------------------------------
# HTTP and the scores the fake makes
# --------------------------------------------------------------------------------------------


def wait_for(url: str, timeout: float = START_SECONDS, describe: Callable[[], str] = lambda: "") -> None:
    """Return once `url` answers 200; raise with `describe()` (a container's logs) if time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            status, body = http_json("GET", url)
            if status == 200:
                return
            last = f"HTTP {status} {body}"
        except (OSError, ValueError) as exc:  # refused or reset, or not yet JSON, while the server starts
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s ({last})\n{describe()}")


def expected_ranking(query: str, documents: list[str]) -> list[tuple[int, float]]:
    """The fake scores each prompt by its hash (the pad anchor skipped, as a model skips it): the ranking a
    correct proxy answers, best first."""
    scores = [hashed_probability(proxy.prompt_for(query, document)) for document in documents]
    return sorted(enumerate(scores), key=lambda pair: (-pair[1], pair[0]))


def ranking(results: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(result["index"], result["relevance_score"]) for result in results]


def assert_correct_rerank(status: int, answer: Any, top_n: int = len(DOCUMENTS)) -> None:
    """A 200 whose results are DOCUMENTS ranked for QUERY, best first, with the fake's exact scores."""
    assert status == 200, answer
    got, expected = ranking(answer["results"]), expected_ranking(QUERY, DOCUMENTS)[:top_n]
    assert [index for index, _ in got] == [index for index, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-12)


# --------------------------------------------------------------------------------------------
# The image, run alone beside a fake Infinity container on a network of its own
# --------------------------------------------------------------------------------------------


@dataclass
class Container:
    name: str
    url: str  # the published port, on 127.0.0.1

    def logs(self) -> str:
        result = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True, timeout=CALL_SECONDS)
        return f"logs of {self.name}:\n{(result.stdout + result.stderr)[-3000:]}"


@pytest.fixture(scope="module")
def network(engine: None) -> Iterator[str]:
    name = f"rerank-ct-{RUN_ID}"
    podman("network", "create", name)
    yield name
    podman("network", "rm", "--force", name, check=False)


@pytest.fixture(scope="module")
def infinity_url(network: str, fake_infinity_image: str) -> Iterator[str]:
    name = f"rerank-ct-{RUN_ID}-infinity"
    podman("run", "--detach", "--name", name, "--network", network, fake_infinity_image,
           "v2", "--model-id", SERVED_MODEL, "--port", "7997", "--url-prefix", "/v1")
    yield f"http://{name}:7997/v1"  # the container's name resolves on the network
    podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture
def run_proxy(proxy_image: str, network: str, infinity_url: str) -> Iterator[Callable[..., Container]]:
    """Start the image as a user would (`docker run -p ... -e ...`), with a port published on 127.0.0.1; wait until
    it is ready; remove it afterwards."""
    names: list[str] = []

    def run(*command: str, ready: bool = True, **environment: str) -> Container:
        name = f"rerank-ct-{RUN_ID}-proxy-{len(names)}"
        names.append(name)
        port = environment.get("PORT", "8002")
        env_args = [arg for key, value in {"INFINITY_URL": infinity_url, **environment}.items()
                    for arg in ("--env", f"{key}={value}")]
        podman("run", "--detach", "--name", name, "--network", network,
               "--publish", f"127.0.0.1:{free_port()}:{port}", *env_args, proxy_image, *command)
        published = podman("port", name, f"{port}/tcp").strip()
        container = Container(name, f"http://{published}")
        if ready:
            wait_for(container.url + "/ready", describe=container.logs)
        return container

    yield run
    for name in names:
        podman("rm", "--force", "--time", "0", name, check=False)


def image_config(image: str) -> dict[str, Any]:
    return json.loads(podman("image", "inspect", image))[0]["Config"]


def healthcheck(name: str) -> subprocess.CompletedProcess:
    """One run of the image's HEALTHCHECK (podman 4.3 runs none by itself without systemd)."""
    return subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, text=True,
                          timeout=CALL_SECONDS)


def test_image_runs_the_proxy_as_its_own_non_root_user(proxy_image: str, run_proxy: Callable[..., Container]) -> None:
    assert image_config(proxy_image)["User"] == IMAGE_USER
    container = run_proxy()
    status = podman("exec", container.name, "cat", "/proc/1/status")  # PID 1 is the proxy itself
    assert re.search(rf"^Uid:\s+{IMAGE_UID}\s+{IMAGE_UID}\s", status, re.M), status
    assert podman("exec", container.name, "id", "-un").strip() == IMAGE_USER
    assert "proxy-classifier.py" in podman("exec", container.name, "cat", "/proc/1/cmdline")


def test_container_is_ready_and_reranks_correctly_against_infinity(run_proxy: Callable[..., Container]) -> None:
    container = run_proxy()
    assert http_json("GET", container.url + "/ready") == (200, {"status": "ready"})
    assert_correct_rerank(*http_json("POST", container.url + "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}))
    assert_correct_rerank(*http_json("POST", container.url + "/v2/rerank",
                                     {"model": SERVED_MODEL, "query": QUERY, "documents": DOCUMENTS, "top_n": 2}),
                          top_n=2)


@pytest.mark.parametrize("port", [None, "8123"], ids=["default-port", "PORT=8123"])
def test_healthcheck_reports_healthy_on_the_port_the_proxy_listens_on(
        port: str | None, run_proxy: Callable[..., Container]) -> None:
    container = run_proxy(**({"PORT": port} if port else {}))
    result = healthcheck(container.name)
    assert result.returncode == 0, (result.stdout, result.stderr, container.logs())
    assert json.loads(podman("inspect", container.name))[0]["State"]["Health"]["Status"] == "healthy"


def test_healthcheck_reports_unhealthy_when_no_proxy_listens(run_proxy: Callable[..., Container]) -> None:
    # The same image and probe, with `sleep` in place of the proxy: the probe is not one that always passes.
    container = run_proxy("sleep", "300", ready=False)
    result = healthcheck(container.name)
    assert result.returncode != 0 and "unhealthy" in result.stdout + result.stderr, (result.stdout, result.stderr)


def test_sigterm_stops_the_container_with_exit_code_0_within_its_grace_period(
        proxy_image: str, run_proxy: Callable[..., Container]) -> None:
    assert image_config(proxy_image).get("StopSignal", "SIGTERM") == "SIGTERM"
    container = run_proxy()
    podman("stop", "--time", str(GRACE_SECONDS), container.name, timeout=GRACE_SECONDS + CALL_SECONDS)
    state = json.loads(podman("inspect", container.name))[0]["State"]
    # Had the proxy ignored SIGTERM, podman would have killed it at the end of the grace period: exit code 137.
    assert (state["Status"], state["ExitCode"]) == ("exited", 0), container.logs()
    assert "Traceback" not in container.logs(), container.logs()


SECRET_NAME = re.compile(r"key|token|secret|password|passwd|credential", re.I)


def test_image_keeps_no_secrets_in_its_layers_or_environment_defaults(proxy_image: str) -> None:
    environment = dict(entry.split("=", 1) for entry in image_config(proxy_image)["Env"])
    assert not [name for name in environment if SECRET_NAME.search(name)], environment
    steps = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", proxy_image).splitlines()
    assert steps and not [step for step in steps if re.search(r"(key|token|secret|password)\w*=", step, re.I)], steps
    # What the build copied: the files the Dockerfile names, nothing else of the working tree (.git, .venv, ...).
    named = {source for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
             for source in sources.split()}
    listing = podman("run", "--rm", "--entrypoint", "ls", proxy_image, "-A", "/app").split()
    assert "proxy-classifier.py" in named and sorted(listing) == sorted(named)


# --------------------------------------------------------------------------------------------
# The compose stack: docker-compose.yaml as written, with the fake Infinity swapped in, on its published ports
# --------------------------------------------------------------------------------------------


@dataclass
class ComposeStack:
    project: str
    litellm: bool  # brought up with --profile litellm

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"  # podman-compose's naming

    def services(self) -> tuple[str, ...]:
        return ("infinity", "proxy", "litellm") if self.litellm else ("infinity", "proxy")

    def logs(self) -> str:
        return "\n".join(Container(self.container(service), "").logs() for service in self.services())


def compose(*args: str, timeout: float = BUILD_SECONDS, profile: bool = False) -> subprocess.CompletedProcess:
    files = [arg for name in COMPOSE_FILES for arg in ("-f", name)]
    env = {**os.environ, "LITELLM_MASTER_KEY": LITELLM_KEY,
           # podman-compose builds the proxy in podman's OCI format, which drops the HEALTHCHECK; Docker keeps it.
           "BUILDAH_FORMAT": "docker"}
    command = [sys.executable, "-m", "podman_compose", "-p", PROJECT, *files,
               *(["--profile", "litellm"] if profile else []), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def wait_until_free(port: int, timeout: float = START_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} is taken: the compose file publishes it") from None
        time.sleep(1)


@pytest.fixture(scope="module")
def compose_stack(engine: None, fake_infinity_image: str) -> Iterator[ComposeStack]:
    """`podman-compose up` on the repository's compose file plus the fake-Infinity override, with the LiteLLM profile
    where litellm-config.yaml is there; `down` afterwards, and the image it built removed."""
    litellm = (ROOT / "litellm-config.yaml").exists()
    with open(COMPOSE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the published ports are fixed: one stack at a time on this machine
        for port in (8002, 7997, 4000):
            wait_until_free(port)
        stack = ComposeStack(PROJECT, litellm)
        try:
            up = compose("up", "--detach", profile=litellm)
            assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
            wait_for("http://127.0.0.1:8002/ready", describe=stack.logs)
            if litellm:
                wait_for("http://127.0.0.1:4000/health/liveliness", describe=stack.logs)
            yield stack
        finally:
            compose("down", "--volumes", "--timeout", "0", profile=litellm, timeout=CALL_SECONDS * 2)
            podman("rmi", "--force", f"localhost/{PROJECT}_proxy", check=False)


def test_compose_stack_reranks_through_the_published_port_8002(compose_stack: ComposeStack) -> None:
    assert_correct_rerank(*http_json("POST", "http://127.0.0.1:8002/v1/rerank",
                                     {"query": QUERY, "documents": DOCUMENTS}))
    # Infinity's own port is published too, and its command line is the one the compose file gives.
    assert http_json("GET", "http://127.0.0.1:7997/health")[0] == 200
    assert http_json("GET", "http://127.0.0.1:8002/v1/models")[1]["data"][0]["id"] == SERVED_MODEL


def test_compose_services_report_healthy_and_restart_unless_stopped(compose_stack: ComposeStack) -> None:
    for service in ("infinity", "proxy"):
        result = healthcheck(compose_stack.container(service))
        assert result.returncode == 0, (service, result.stdout, result.stderr, compose_stack.logs())
        host_config = json.loads(podman("inspect", compose_stack.container(service)))[0]["HostConfig"]
        assert host_config["RestartPolicy"]["Name"] == "unless-stopped"
    mounts = json.loads(podman("inspect", compose_stack.container("infinity")))[0]["Mounts"]
    assert [(mount["Name"], mount["Destination"]) for mount in mounts] == [(f"{PROJECT}_infinity-cache", "/app/.cache")]


def require_litellm_profile(stack: ComposeStack) -> None:
    if not stack.litellm:
        message = "litellm-config.yaml is missing: the compose file's litellm service mounts it"
        if strict_environment():
            pytest.fail(f"{message}; PROXY_TESTS_REQUIRE_ALL=1 does not allow skipping it")
        pytest.skip(message)


def test_compose_litellm_profile_reranks_through_litellm_on_port_4000(compose_stack: ComposeStack) -> None:
    require_litellm_profile(compose_stack)
    mounts = json.loads(podman("inspect", compose_stack.container("litellm")))[0]["Mounts"]
    assert [(mount["Destination"], mount["RW"]) for mount in mounts] == [("/app/config.yaml", False)]
    key = {"Authorization": f"Bearer {LITELLM_KEY}"}
    body = {"model": "mxbai-rerank", "query": QUERY, "documents": DOCUMENTS}
    assert_correct_rerank(*http_json("POST", "http://127.0.0.1:4000/rerank", body, key))
    cohere_body = {**body, "model": "mxbai-rerank-cohere"}
    assert_correct_rerank(*http_json("POST", "http://127.0.0.1:4000/v2/rerank", cohere_body, key))
    # The master key comes from the environment compose was started in: without it, LiteLLM refuses.
    request = urllib.request.Request("http://127.0.0.1:4000/rerank", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError):
        LOCAL_HTTP.open(request, timeout=CALL_SECONDS)


def test_compose_stop_ends_every_service_with_exit_code_0(compose_stack: ComposeStack) -> None:
    # Last of this file's compose tests (pytest runs them in file order): it stops the stack. podman-compose stops
    # each container with the compose file's stop_grace_period (10 s where it gives none); SIGTERM must end each one
    # within it, or podman kills it and the exit code is 137.
    result = compose("stop", timeout=GRACE_SECONDS + CALL_SECONDS, profile=compose_stack.litellm)
    assert result.returncode == 0, result.stderr[-3000:]
    for service in compose_stack.services():
        state = json.loads(podman("inspect", compose_stack.container(service)))[0]["State"]
        assert (service, state["Status"], state["ExitCode"]) == (service, "exited", 0), compose_stack.logs()
