"""``kubectl`` and ``docker`` for README "In EKS"'s blocks, where no cluster and no Docker
engine exist (tests/test_readme_eks.py). Every command the README uses is either simulated with
what can be checked here, or refused (exit 2), so a README that starts using another command
fails its test instead of passing untested:

- ``kubectl create configmap NAME --from-file=[KEY=]PATH...``, ``create secret generic NAME
  --from-file=KEY=PATH``: the object is written as kubectl would send it, validated by
  ``kubernetes-validate --strict``, and recorded (``$KUBECTL_SIM/<kind>/<name>/<key>``);
- ``kubectl apply -f DIR``: each ``*.yaml`` validated by ``kubernetes-validate --strict`` and
  recorded (``$KUBECTL_SIM/applied/``); the test's simulated kubelet starts the pod from it;
- ``kubectl wait --for=condition=Available deployment/NAME --timeout=T``: until the simulated
  kubelet reports the pod Ready (``$KUBECTL_SIM/ready-NAME``) or T passes;
- ``kubectl get events --field-selector reason=R``: the Events the stand-in API server holds
  (``$KUBECTL_SIM/events.txt``, written by the test), filtered;
- ``kubectl delete secret NAME``;
- ``docker build -t TAG .``: ``hadolint`` on the Dockerfile (the build itself cannot run);
  ``docker push TAG``: nothing to push to.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIM = Path(os.environ.get("KUBECTL_SIM", "."))


def validate(document: dict[str, object], name: str) -> None:
    path = SIM / f"{name}.json"
    path.write_text(json.dumps(document))
    validate_file(path)


def validate_file(path: Path) -> None:
    done = subprocess.run(
        [os.environ["KUBERNETES_VALIDATE"], "--strict", "--quiet", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"kubectl (simulated): invalid {path.name}: {done.stdout}{done.stderr}")


def from_files(args: list[str]) -> dict[str, Path]:
    files = {}
    for arg in args:
        value = arg.removeprefix("--from-file=")
        key, _, source = value.rpartition("=")
        files[key or Path(source).name] = Path(source)
    return files


def kubectl(argv: list[str]) -> int:
    namespace = "default"
    args: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-n", "--namespace"):
            namespace = next(it)
        else:
            args.append(arg)
    match args:
        case ["create", "configmap", name, *rest] if all(
            a.startswith("--from-file=") for a in rest
        ):
            files = from_files(rest)
            data = {key: path.read_text() for key, path in files.items()}
            validate({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": name, "namespace": namespace}, "data": data},
                     f"configmap-{name}")  # fmt: skip
            record(SIM / "configmap" / name, files)
            print(f"configmap/{name} created")
        case ["create", "secret", "generic", name, *rest] if all(
            a.startswith("--from-file=") for a in rest
        ):
            files = from_files(rest)
            data = {k: base64.b64encode(p.read_bytes()).decode() for k, p in files.items()}
            validate({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                      "metadata": {"name": name, "namespace": namespace}, "data": data},
                     f"secret-{name}")  # fmt: skip
            record(SIM / "secret" / name, files)
            print(f"secret/{name} created")
        case ["apply", "-f", directory]:
            for path in sorted(Path(directory).glob("*.yaml")):
                validate_file(path)
                (SIM / "applied").mkdir(exist_ok=True)
                shutil.copy(path, SIM / "applied" / path.name)
                print(f"{path.name} applied (validated)")
            (SIM / "applied.done").touch()
        case ["wait", "--for=condition=Available", target, timeout]:
            name = target.removeprefix("deployment/")
            seconds = parse_timeout(timeout.removeprefix("--timeout="))
            deadline = time.monotonic() + seconds
            while not (SIM / f"ready-{name}").exists():
                if time.monotonic() > deadline:
                    sys.exit(f"error: timed out waiting for the condition on deployments/{name}")
                time.sleep(0.2)  # polling, as kubectl's own wait does with its watch
            print(f"deployment.apps/{name} condition met")
        case ["get", "events", "--field-selector", selector] if selector.startswith("reason="):
            reason = selector.removeprefix("reason=")
            lines = (SIM / "events.txt").read_text().splitlines()
            print("\n".join(line for line in lines if f" {reason} " in f" {line} "))
        case ["delete", "secret", name]:
            shutil.rmtree(SIM / "secret" / name)
            print(f'secret "{name}" deleted')
        case _:
            print(f"kubectl (simulated): not simulated: {' '.join(argv)}", file=sys.stderr)
            return 2
    return 0


def record(directory: Path, files: dict[str, Path]) -> None:
    directory.mkdir(parents=True)
    for key, path in files.items():
        shutil.copy(path, directory / key)


def parse_timeout(text: str) -> float:
    match = re.fullmatch(r"(\d+)([sm])", text)
    if not match:
        sys.exit(f"kubectl (simulated): timeout {text!r}")
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def docker(argv: list[str]) -> int:
    match argv:
        case ["build", "-t", tag, "."]:
            done = subprocess.run([os.environ["HADOLINT"], "Dockerfile"], check=False)
            if done.returncode != 0:
                return done.returncode
            print(f"docker (simulated): Dockerfile passes hadolint; {tag} not built (no engine)")
        case ["push", tag]:
            print(f"docker (simulated): {tag} not pushed (no registry)")
        case _:
            print(f"docker (simulated): not simulated: {' '.join(argv)}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    tool, *rest = sys.argv[1:]
    raise SystemExit(kubectl(rest) if tool == "kubectl" else docker(rest))
