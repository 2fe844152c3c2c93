"""Schemathesis against real `peftreg serve` processes: the OpenAPI document tells the truth.

Both configurations run at once, each with a fixed seed and every check on: the
anonymous loopback default, and the token-protected one (anonymous access off,
requests carrying the admin token). On the first, the coverage phase sends each
operation its boundary and invalid inputs and a method it does not serve, and the
fuzzing phase a few generated requests more; these are answered alike in both
configurations, so the token-protected run fuzzes only (a few more per operation),
each request also without and with wrong credentials.

A run passes only without server errors, undocumented statuses, content types or
headers, response-schema violations, accepted invalid input or refused valid input,
405s without `Allow`, or ignored credentials.

Where the schema cannot say what the state of the registry decides, the expected
statuses of `positive_data_acceptance` name it: a manifest naming blobs that are not
there, a blob whose bytes do not hash to the claimed digest, a cursor that no page
handed out, a registry token asked for another service (all 400 with their OCI error
codes).
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import ADMIN_TOKEN
from tests.fixtures.server import RegistryProcess

SEED = 20261206
CONFIG = """
seed = {seed}
workers = 1
request-timeout = 20
warnings = false

[generation]
max-examples = {examples}
database = "none"

[phases.examples]
enabled = false

[phases.coverage]
enabled = {coverage}
unexpected-methods = ["TRACE"]
generate-duplicate-query-parameters = false

[phases.stateful]
enabled = false

[checks]
enabled = true

# A watch waits for its timeout: ask for none.
[[operations]]
include-path-regex = "/watch$"
parameters = {{ "timeout" = 0 }}

[[operations]]
include-path-regex = "^/v2/\\\\{{name\\\\}}/(manifests/\\\\{{reference\\\\}}|blobs/uploads/)"
include-method-regex = "^(PUT|POST)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409"]

[[operations]]
include-path-regex = "^/api/v1/(repositories|versions|repositories/\\\\{{name\\\\}}/versions)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404"]

# A token is issued only for this registry's own service name, which the request's
# Host decides.
[[operations]]
include-path-regex = "^/token$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403"]
"""


def schemathesis(server: RegistryProcess, config: Path, *headers: str) -> tuple[int, str]:
    """Run the schemathesis CLI (in the config's folder, where it keeps its cache)."""
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(config),
        "run",
        f"{server.url}/openapi.json",
        "--no-color",
    ]
    for header in headers:
        command += ["-H", header]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=240, check=False, cwd=config.parent
    )
    return done.returncode, done.stdout + done.stderr


def test_the_service_conforms_to_its_openapi_document(
    registry_server: RegistryProcess, secured_server: RegistryProcess, tmp_path: Path
) -> None:
    configs = [tmp_path / run / "schemathesis.toml" for run in ("anonymous", "secured")]
    # Boundaries, invalid input and unserved methods are answered alike in both: the
    # token-protected run fuzzes (with, without and with wrong credentials) only.
    for config, coverage, examples in zip(configs, ("true", "false"), (2, 4), strict=True):
        config.parent.mkdir()
        config.write_text(CONFIG.format(seed=SEED, coverage=coverage, examples=examples))
    with ThreadPoolExecutor(max_workers=2) as pool:
        anonymous = pool.submit(schemathesis, registry_server, configs[0])
        secured = pool.submit(
            schemathesis, secured_server, configs[1], f"Authorization: Bearer {ADMIN_TOKEN}"
        )
        runs = {"anonymous loopback": anonymous.result(), "token-protected": secured.result()}
    for name, (code, output) in runs.items():
        assert code == 0, f"{name}:\n{output[-6000:]}"
        counts = re.search(r"(\d+) generated, (\d+) passed", output)
        assert counts is not None, output[-2000:]
        assert int(counts[1]) == int(counts[2]) >= 100
    for server in (registry_server, secured_server):
        assert "Traceback" not in server.log_tail(400)
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    the_document_names_what_the_service_does(secured_server)


def the_document_names_what_the_service_does(secured_server: RegistryProcess) -> None:
    document = httpx.get(f"{secured_server.url}/openapi.json").json()
    paths = document["paths"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "A registry token"},
        "basic": {
            "type": "http",
            "scheme": "basic",
            "description": "Any user, the token as password",
        },
    }
    put = paths["/v2/{name}/manifests/{reference}"]["put"]
    assert put["security"] == [{"bearer": []}, {"basic": []}]  # no anonymous access here
    assert set(put["responses"]) == {"201", "400", "401", "403", "409", "413", "422"}
    assert "LAYER_TITLE_INVALID" in put["responses"]["422"]["description"]
    error = put["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    parameters = {parameter["name"]: parameter["schema"] for parameter in put["parameters"]}
    assert parameters["name"]["pattern"].startswith("^[a-z0-9]+")
    assert parameters["reference"]["pattern"].endswith("sha512:[0-9a-f]{128})$")
    for operations in paths.values():
        for operation in operations.values():
            assert "422" not in operation["responses"] or (
                operation["responses"]["422"]["description"].startswith("OCI error")
            )
