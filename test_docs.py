"""The documentation stays true: the README and docs/ against the proxy, the repository's files and each other.

Fast (the fake Infinity of conftest.py, no torch). What it holds: every --help flag is on docs/configuration.md
with its environment variable; every relative link and #anchor resolves; every fenced command block of the README
is run here or marked as not run, with the reason; the README's example answer is the proxy's; the proxy's real
answers, a success and an error on each route, are valid against docs/openapi.yaml; the files the docs describe
(litellm-config.yaml, docker-compose.yaml, .dockerignore, the Dockerfile's label, examples/, the test tiers in
pyproject.toml) say what the docs say; and nothing in the repository points outside it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomllib
import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_openapi_document
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from conftest import ROOT, free_port, proxy

DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md"]
EXPECTED_PAGES = {"api.md", "configuration.md", "clients.md", "litellm.md", "deployment.md", "operations.md",
                  "how-it-works.md", "development.md"}
# A fenced block, with the HTML comment on the line above it when there is one.
FENCED = re.compile(r"(?:^<!--(?P<note>.*?)-->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.M | re.S)
COMMAND_LANGUAGES = {"", "sh", "bash", "shell", "console", "python"}


def fenced_blocks(text: str) -> list[re.Match[str]]:
    return list(FENCED.finditer(text))


def prose(text: str) -> str:
    """The text without its fenced blocks and inline code, where links are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


# --------------------------------------------------------------------------------------------
# The README is a short guide; docs/ holds the reference
# --------------------------------------------------------------------------------------------


def test_readme_is_a_short_guide_that_reaches_a_litellm_call_early() -> None:
    text = README.read_text()
    assert len(text.encode()) <= 12 * 1024, len(text.encode())
    first = "\n".join(text.splitlines()[:150])
    assert "git clone" in first and "proxy-classifier.py --infinity-url" in first
    assert "litellm.rerank(" in first and "litellm-config.yaml" in first
    assert {page.name for page in DOCS.glob("*.md")} == EXPECTED_PAGES
    for page in EXPECTED_PAGES:  # each page linked from the README
        assert f"](docs/{page})" in text, page


def test_nothing_in_the_repository_points_outside_it() -> None:
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    outside = ["CONT" + "RACT.md", ".." + "/shared"]  # spelled apart so that this file does not match itself
    found = [(name, word) for name in tracked if (ROOT / name).is_file()
             for word in outside if word in (ROOT / name).read_text(errors="replace")]
    assert not found, found


# --------------------------------------------------------------------------------------------
# Configuration: every flag, its variable, the levels the proxy takes
# --------------------------------------------------------------------------------------------


def test_every_help_flag_is_on_the_configuration_page_with_its_variable() -> None:
    shown = subprocess.run([sys.executable, str(ROOT / "proxy-classifier.py"), "--help"], capture_output=True,
                           text=True, check=True).stdout
    flags = set(re.findall(r"^  (?:-\w, )?(--[a-z][a-z-]+)", shown, re.M))  # the option lines, not their help text
    configuration = (DOCS / "configuration.md").read_text()
    options = {flag for flag, _, _ in proxy.OPTIONS}
    assert options <= flags and flags - options == {"--help", "--version"}
    for flag in sorted(options):
        assert re.search(rf"^\| `{flag}` \| `{proxy.env_name(flag)}` \|", configuration, re.M), flag
        assert f"[env {proxy.env_name(flag)}; default" in re.sub(r"\s+", " ", shown), flag
    assert "`--version`" in configuration and "`--help`" in configuration


def test_the_configuration_page_shows_each_options_default_and_no_placeholder() -> None:
    configuration = (DOCS / "configuration.md").read_text()
    assert not re.search(r"^[A-Z][A-Z_]{5,}$", configuration, re.M), "a placeholder is left in docs/configuration.md"
    defaults = proxy.Config()
    for flag, _, _ in proxy.OPTIONS:
        row = next(line for line in configuration.splitlines() if line.startswith(f"| `{flag}` |"))
        value = getattr(defaults, flag[2:].replace("-", "_"))
        shown = "(none)" if value in ("", None) else f"{value:g}" if isinstance(value, float) else str(value)
        assert f"| `{shown}`" in row or f"| {shown} |" in row or f"| `{shown}` (" in row, (flag, shown, row)


def test_the_readme_sets_up_and_tests_as_ci_does() -> None:
    ci, readme = (ROOT / ".ci" / "run").read_text(), README.read_text()
    assert "./setup.sh --dev" in ci and ".venv/bin/python -m pytest" in ci
    assert "./setup.sh --dev" in readme and ".venv/bin/python -m pytest" in readme


def test_the_log_levels_on_the_configuration_page_are_the_ones_the_proxy_takes() -> None:
    row = next(line for line in (DOCS / "configuration.md").read_text().splitlines() if line.startswith("| `--log-level`"))
    meaning = row.split("|")[4].split(", in any case")[0]
    levels = re.findall(r"`([A-Z]+)`", meaning)
    assert levels == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    for level in [*levels, "critical"]:
        proxy.load_config(["--log-level", level], environ={})
    with pytest.raises(SystemExit):
        proxy.load_config(["--log-level", "LOUD"], environ={})


def test_version_has_one_source_for_the_flag_the_image_label_and_the_openapi_file() -> None:
    printed = subprocess.run([sys.executable, str(ROOT / "proxy-classifier.py"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert printed == f"proxy-classifier.py {proxy.PROXY_VERSION}\n"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG PROXY_VERSION={re.escape(proxy.PROXY_VERSION)}$", dockerfile, re.M)
    assert 'org.opencontainers.image.version="${PROXY_VERSION}"' in dockerfile
    assert yaml.safe_load((DOCS / "openapi.yaml").read_text())["info"]["version"] == proxy.PROXY_VERSION


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------


def anchors_of(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCED.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves_with_its_anchor(page: Path) -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text()))
    assert links or (page.name == "README.md" and page.parent.name == "bench")
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link}"
        assert ROOT in target.parents or target == ROOT, f"{page.name}: {link} leaves the repository"
        if anchor and target.suffix == ".md":
            assert anchor in anchors_of(target.read_text()), f"{page.name}: {link}"


# --------------------------------------------------------------------------------------------
# The README's commands: run here, or marked with why not
# --------------------------------------------------------------------------------------------


def test_every_command_block_of_the_readme_is_run_or_marked_with_the_reason() -> None:
    tests_here = {name for name in globals() if name.startswith("test_")}
    for block in fenced_blocks(README.read_text()):
        if block["lang"] not in COMMAND_LANGUAGES:
            continue
        note = (block["note"] or "").strip()
        assert note.startswith(("run:", "not run")), f"a command block without a note:\n{block['body']}"
        if note.startswith("run:"):
            named = re.search(r"test_docs\.py::(\w+)", note)
            assert named and named[1] in tests_here, note
        else:
            assert len(note.split(":", 1)[1].strip()) > 10, f"no reason given: {note}"


def readme_block_after(marker: str, lang: str) -> str:
    blocks = fenced_blocks(README.read_text())
    index = next(i for i, block in enumerate(blocks) if marker in block["body"])
    return next(block["body"] for block in blocks[index:] if block["lang"] == lang)


async def test_readme_quick_start_serves_the_answer_it_shows(fake_infinity: Any) -> None:
    """The README's start line and curl command, run as written but for the ports: the answer it shows, but for
    the id and the time, is the one they give against the fake Infinity."""
    start = next(line for line in readme_block_after("proxy-classifier.py --infinity-url", "sh").splitlines()
                 if "proxy-classifier.py" in line)
    curl = readme_block_after("curl -s http://localhost:8002/v1/rerank", "sh").strip()
    shown = json.loads(readme_block_after('"object": "rerank"', "json"))
    port = free_port()
    argv = shlex.split(start)
    assert argv[:2] == [".venv/bin/python", "proxy-classifier.py"]
    argv = [sys.executable, str(ROOT / "proxy-classifier.py"), *argv[2:], "--port", str(port)]
    argv[argv.index("http://localhost:7997/v1")] = fake_infinity.url
    process = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as answer:
                        if answer.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "the proxy did not listen within 30 s"
                    await asyncio.sleep(0.1)
        command = shlex.split(curl.replace("localhost:8002", f"127.0.0.1:{port}"))
        assert command[0] == "curl"
        ran = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        out, _ = await ran.communicate()
    finally:
        process.terminate()
        await process.wait()
    answer = json.loads(out)
    for changing in ("id", "created"):
        assert isinstance(answer.pop(changing), type(shown.pop(changing)))
    assert answer == shown


# --------------------------------------------------------------------------------------------
# How it works: the prompt shown is the proxy's
# --------------------------------------------------------------------------------------------


def test_the_prompt_shown_is_the_one_the_proxy_writes() -> None:
    text = (DOCS / "how-it-works.md").read_text()
    block = next(block["body"] for block in fenced_blocks(text) if block["lang"] == "text")
    assert block == proxy.prompt_for("{query}", "{document}")


# --------------------------------------------------------------------------------------------
# The files the docs describe
# --------------------------------------------------------------------------------------------


def test_dockerignore_keeps_every_venv_and_cache_out_of_the_build_context() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/"))
                   or fnmatch.fnmatch(path.split("/")[-1], pattern.removeprefix("**/")) for pattern in patterns)

    for path in (".venv", ".venv-gateway", ".venv-clients", ".venv-anything", ".git", "__pycache__",
                 "bench/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "bench/results", ".env"):
        assert ignored(path), path
    for path in ("proxy-classifier.py", "requirements.txt", "requirements-speedups.txt"):
        assert not ignored(path), path


def test_compose_refuses_to_start_litellm_without_a_master_key() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    environment = compose["services"]["litellm"]["environment"]
    assert any(re.fullmatch(r"LITELLM_MASTER_KEY=\$\{LITELLM_MASTER_KEY:\?.+\}", item) for item in environment)


def test_the_readme_names_the_model_the_setup_serves() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    served = re.search(r"--model-id (\S+)", compose["services"]["infinity"]["command"])[1]
    assert served == proxy.Config().model
    models = set(re.findall(r"michaelfeil/mxbai-rerank-\w+-v2-seq", "\n".join(
        block["body"] for block in fenced_blocks(README.read_text()))))
    assert models == {served}


# Moved from test_gateway.py, where the gateway tier's autouse fixture skipped it without LiteLLM.
def environment_variables_in(value: Any) -> set[str]:
    """The variables a LiteLLM config reads: its values of the form os.environ/NAME."""
    if isinstance(value, dict):
        return set().union(*map(environment_variables_in, value.values()))
    if isinstance(value, list):
        return set().union(*map(environment_variables_in, value))
    return {value.removeprefix("os.environ/")} if isinstance(value, str) and value.startswith("os.environ/") else set()


def test_the_config_needs_only_the_proxy_url_and_the_master_key() -> None:
    config = yaml.safe_load((ROOT / "litellm-config.yaml").read_text())
    assert environment_variables_in(config) == {"LITELLM_MASTER_KEY", "RERANK_PROXY_URL"}
    assert all(d["model_info"] == {"mode": "rerank"} for d in config["model_list"])
    assert sorted(d["litellm_params"]["model"].split("/")[0] for d in config["model_list"]) == ["cohere", "infinity"]


# Moved from test_clients.py (skipped there with the end-to-end tier) and pointed at docs/clients.md, which now links
# each example file instead of holding a second copy of it.
@pytest.mark.parametrize("example", sorted(path.stem for path in (ROOT / "examples").glob("*.py")))
def test_the_clients_page_links_each_example_file_and_holds_no_copy(example: str) -> None:
    page = (DOCS / "clients.md").read_text()
    code = (ROOT / "examples" / f"{example}.py").read_text()
    assert f"[`examples/{example}.py`](../examples/{example}.py)" in page
    body = next(line for line in code.splitlines() if line.startswith("def rerank"))
    assert body not in page


def test_the_test_tiers_are_defined_once_and_every_command_uses_one() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    markers = {line.split(":")[0] for line in pyproject["tool"]["pytest"]["ini_options"]["markers"]}
    assert markers == {"e2e", "container", "slow"}
    tiers = pyproject["tool"]["rerank-proxy"]["tiers"]
    assert "addinivalue_line" not in (ROOT / "conftest.py").read_text()  # no second place that defines markers
    used = set()
    for path in [*PAGES, ROOT / ".ci" / "run"]:
        used |= {(path.name, expression) for expression in re.findall(r"pytest[^\n`]*? -m \"([^\"]*)\"", path.read_text())}
    assert used and {expression for _, expression in used} <= set(tiers.values()), used
    table = (DOCS / "development.md").read_text()
    for name, expression in tiers.items():
        shown = f'`"{expression}"`' if expression else "(none)"
        assert re.search(rf"^\| {re.escape(name)} \| {re.escape(shown)} \|", table, re.M), name
    for row in re.findall(r"^\| `(test_\w+\.py)`", table, re.M):
        assert (ROOT / row).exists(), row
    assert {path.name for path in ROOT.glob("test_*.py")} <= set(re.findall(r"^\| `(test_\w+\.py)`", table, re.M))
    for named in set(re.findall(r"`(requirements[\w-]*\.txt)`", table)):
        assert (ROOT / named).exists(), named


# --------------------------------------------------------------------------------------------
# docs/openapi.yaml against the proxy's real answers
# --------------------------------------------------------------------------------------------

SPEC = yaml.safe_load((DOCS / "openapi.yaml").read_text())
REGISTRY = Registry().with_resource("urn:openapi", Resource.from_contents(SPEC, default_specification=DRAFT202012))
KEY = "docs-test-key"
RERANK_BODY = {"query": "capital of France", "documents": ["Paris is the capital.", "Berlin is in Germany."]}


def test_the_openapi_file_is_valid_openapi_3_1() -> None:
    validate_openapi_document(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def pointer(*parts: str) -> str:
    return "urn:openapi#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def check_against_spec(path: str, method: str, status: int, body: bytes, content_type: str,
                       request: Any = None) -> None:
    operation = SPEC["paths"][path][method]
    responses = operation["responses"]
    key = str(status) if str(status) in responses else "default"
    assert key in responses, f"{method.upper()} {path} answers {status}, which openapi.yaml does not list"
    if request is not None:  # the request the proxy served is one the file describes
        OAS31Validator({"$ref": "urn:openapi#/components/schemas/RerankRequest"} if path == "/v2/rerank" else
                       {"oneOf": [{"$ref": "urn:openapi#/components/schemas/RerankRequest"},
                                  {"$ref": "urn:openapi#/components/schemas/TeiRerankRequest"}]},
                       registry=REGISTRY).validate(request)
    content = responses[key].get("content") or (
        SPEC["components"]["responses"]["Error"]["content"] if "$ref" in responses[key] else {})
    if "application/json" in content:
        assert content_type == "application/json", (path, status, content_type)
        ref = (responses[key]["$ref"] + "/content/application~1json/schema").replace("#", "urn:openapi#") \
            if "$ref" in responses[key] else pointer("paths", path, method, "responses", key, "content",
                                                     "application/json", "schema")
        OAS31Validator({"$ref": ref}, registry=REGISTRY).validate(json.loads(body))
    elif "text/plain" in content:
        assert content_type == "text/plain", (path, status, content_type)


# (spec path, method, request path, json body or None, keyed proxy, status expected)
EXCHANGES = [
    ("/rerank", "post", "/rerank", RERANK_BODY, False, 200),
    ("/rerank", "post", "/rerank", {"query": "q", "texts": ["a", "b"], "return_text": True}, False, 200),
    ("/rerank", "post", "/rerank", {"query": "", "documents": ["a"]}, False, 400),
    ("/v1/rerank", "post", "/v1/rerank", {**RERANK_BODY, "return_documents": True, "top_n": 1}, False, 200),
    ("/v1/rerank", "post", "/v1/rerank", RERANK_BODY, True, 401),
    ("/v2/rerank", "post", "/v2/rerank", {**RERANK_BODY, "return_documents": True, "raw_scores": True}, False, 200),
    ("/v2/rerank", "post", "/v2/rerank", {**RERANK_BODY, "top_n": "1"}, False, 400),
    ("/health", "get", "/health", None, True, 200),
    ("/ready", "get", "/ready", None, True, 200),
    # each GET route behind the key: its answer, and its 401 when the proxy has a key the request lacks
    *[(path, "get", path, None, keyed, 401 if keyed else 200)
      for path in ("/info", "/v1/info", "/metrics", "/models", "/v1/models") for keyed in (False, True)],
    ("/v1/{tail}", "post", "/v1/embeddings", {"model": "m", "input": ["text"]}, False, 200),
    ("/v1/{tail}", "post", "/v1/embeddings", {"model": "m", "input": ["  "]}, False, 400),
]


@pytest.mark.parametrize(("spec_path", "method", "path", "body", "keyed", "status"), EXCHANGES,
                         ids=[f"{m} {p} {'keyed ' if k else ''}{s}" for _, m, p, _, k, s in EXCHANGES])
async def test_each_routes_real_answer_is_valid_against_the_openapi_file(
        make_proxy: Any, spec_path: str, method: str, path: str, body: Any, keyed: bool, status: int) -> None:
    client = await make_proxy(api_key=KEY if keyed else "")
    answer = await client.request(method.upper(), path, json=body)
    raw = await answer.read()
    assert answer.status == status, raw
    assert answer.headers.get("X-Request-ID")
    check_against_spec(spec_path, method, status, raw, answer.content_type,
                       request=body if path.endswith("rerank") and status == 200 else None)


async def test_the_error_answers_of_probes_and_unknown_routes_are_valid_against_the_openapi_file(
        make_proxy: Any, unlistened_socket: Any) -> None:
    host, port = unlistened_socket.getsockname()
    down = await make_proxy(infinity_url=f"http://{host}:{port}/v1")
    answer = await down.get("/ready")
    assert answer.status == 503
    check_against_spec("/ready", "get", 503, await answer.read(), answer.content_type)
    answer = await down.post("/v2/rerank", json=RERANK_BODY)
    assert answer.status == 502
    check_against_spec("/v2/rerank", "post", 502, await answer.read(), answer.content_type)
    answer = await down.post("/health")  # another method on a local route: the error shape, 405
    assert answer.status == 405
    error = SPEC["components"]["schemas"]["Error"]
    OAS31Validator(error, registry=REGISTRY).validate(await answer.json())
    answer = await down.get("/elsewhere")  # outside Infinity's prefix: a local 404
    assert answer.status == 404
    OAS31Validator(error, registry=REGISTRY).validate(await answer.json())


def test_the_template_file_shown_loads_and_writes_qwen3s_prompt(tmp_path: Path) -> None:
    text = (DOCS / "how-it-works.md").read_text()
    shown = next(block["body"] for block in fenced_blocks(text) if block["lang"] == "json" and '"templates"' in
                 block["body"])
    (tmp_path / "templates.json").write_text(shown)
    templates = proxy.templates_from_file(str(tmp_path / "templates.json"))
    code = proxy.template_for(templates, "", "my-code-reranker")
    assert code.name == "qwen3-code-reranker"
    qwen3 = proxy.TEMPLATES["qwen3-reranker"]
    assert proxy.prompt_for("q", "d", code.default_instruction, code) == proxy.prompt_for(
        "q", "d", code.default_instruction, qwen3)
    # The mistake the page quotes is the one the proxy reports.
    quoted = " ".join(re.search(r"`(--template-file t\.json: templates\[0\]\.query_line[^`]*)`", text)[1].split())
    broken = json.loads(shown)
    broken["templates"][0]["query_line"] = "<Query>:\n"
    (tmp_path / "t.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError) as refused:
        proxy.templates_from_file(str(tmp_path / "t.json"))
    assert str(refused.value).replace(str(tmp_path / "t.json"), "t.json").startswith(quoted)
