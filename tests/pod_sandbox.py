"""Run a program the way a pod's container runs it, as far as its filesystem and user go.

No container runtime runs on these machines, so tests/test_pod_enrollment.py runs the real agent
through this script, as root, under ``unshare --mount --propagation private`` (a mount namespace
of its own: nothing here is visible outside it, nothing on the host changes):

1. ``/etc``, ``/var/lib`` and ``/run`` get an overlay (upper layer on a tmpfs), so that the
   manifest's mount points (``/etc/byoc-agent``, ``/var/lib/byoc-agent``, ...) can be made
   without touching the host; ``/etc/hosts`` gets the names the pod's DNS would resolve;
2. each volume of the container is bind-mounted at its ``mountPath``, read-only where the
   manifest says ``readOnly``;
3. every other mount becomes read-only (``readOnlyRootFilesystem: true``);
4. the program runs as the manifest's ``runAsUser``/``runAsGroup``, no supplementary groups
   (the pod's ``fsGroup`` is applied by the caller to the volume directories, as the kubelet
   would on first mount), with no capabilities.

Not modelled: the container's own network namespace (the agent shares the test machine's), cgroups
(limits), seccomp, and the image's filesystem (the test machine's stands in for it).

Usage: ``python pod_sandbox.py SPEC.json`` with ``{"volumes": [{"source", "target",
"read_only"}], "hosts": "...", "uid", "gid", "argv": [...], "env": {...}}``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL = ("/proc", "/sys", "/dev")


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        points = [line.split()[4] for line in info]
    return [p.replace("\\040", " ") for p in points]


def traversable(path: Path, scratch: Path) -> None:
    """Make every directory above ``path`` enterable by others, in this namespace only (e.g.
    /root, 0700, holding the Python the virtual environment links to): a tmpfs goes over the
    closed directory and the one child on the way is bound back into it."""
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if parent == Path("/") or mode & stat.S_IXOTH:
            continue
        child = path.relative_to(parent).parts[0]
        keep = scratch / f"keep-{abs(hash(parent))}"
        keep.mkdir()
        mount("--bind", str(parent / child), str(keep))
        mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(parent))
        (parent / child).mkdir()
        mount("--bind", str(keep), str(parent / child))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    mount("--make-rprivate", "/")
    scratch = Path(tempfile.mkdtemp(prefix="pod-"))
    mount("-t", "tmpfs", "tmpfs", str(scratch))
    for target in ("/etc", "/var/lib", "/run"):
        layer = scratch / target.strip("/").replace("/", "-")
        (layer / "upper").mkdir(parents=True)
        (layer / "work").mkdir()
        mount("-t", "overlay", "overlay", "-o",
              f"lowerdir={target},upperdir={layer}/upper,workdir={layer}/work", target)  # fmt: skip
    Path("/etc/hosts").write_text(spec["hosts"])
    for program in (spec["argv"][0], sys.executable):
        traversable(Path(os.path.realpath(program)), scratch)
    volumes = spec["volumes"]
    for volume in volumes:
        Path(volume["target"]).mkdir(parents=True, exist_ok=True)
        mount("--bind", volume["source"], volume["target"])
        if volume["read_only"]:
            mount("-o", "remount,bind,ro", volume["target"])
    writable = {v["target"] for v in volumes if not v["read_only"]}
    for point in mount_points():
        if point in writable or point.startswith(KERNEL):
            continue
        # Mount points hidden under later mounts cannot be reached: skip what fails.
        subprocess.run(["mount", "-o", "remount,bind,ro", point], check=False,
                       capture_output=True)  # fmt: skip
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    os.chdir("/")
    os.execve(spec["argv"][0], spec["argv"], spec["env"])  # noqa: S606  # no shell on purpose


if __name__ == "__main__":
    main()
