#!/bin/sh
# Install the BYOC agent on a host (an EC2 instance with systemd): the service user and the
# approvers' group, the unit, the directories, a virtual environment with the agent, and a
# configuration to edit. Run as root from a clone of the repository:
#
#   make install                        # onto this host (this script)
#   make install DRIVER=systemd         # also the systemd driver's polkit rule, drop-in,
#                                       # example workload unit and /opt/milvus
#   make install WITH_VENV=0            # without /opt/byoc-agent (you install the agent there)
#   make install DESTDIR=/tmp/stage     # into a staging tree (packaging): no users, owners or
#                                       # systemctl; the venv's scripts still name /opt/byoc-agent
#
# The venv is made with $PYTHON (default python3, 3.11+) and pip installs the versions pinned in
# constraints.txt; pip's own settings apply (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, pip.conf).
# Idempotent: a file that is already as shipped is left alone, an edited configuration is never
# overwritten, and the venv is rebuilt only when the source or constraints.txt changed.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
driver=${DRIVER:-process}
python=${PYTHON:-python3}
with_venv=${WITH_VENV:-1}
venv=/opt/byoc-agent

case "$driver" in process | systemd) ;; *) echo "install-host: DRIVER must be process or systemd" >&2; exit 2 ;; esac
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    echo "install-host: run as root (or set DESTDIR to stage into a directory)" >&2
    exit 1
fi

say() { printf 'install-host: %s\n' "$*"; }

# put MODE SOURCE TARGET: install SOURCE as TARGET unless TARGET already has that content and mode.
put() {
    if [ -f "$3" ] && cmp -s "$2" "$3" && [ "$(stat -c %a "$3")" = "${1#0}" ]; then
        return 0
    fi
    install -m "$1" "$2" "$3"
    say "installed $3"
}

# dir MODE OWNER:GROUP PATH: a directory with that mode (and owner, unless staging).
dir() {
    [ -d "$root$3" ] || say "created $root$3"
    install -d -m "$1" "$root$3"
    if [ -z "$root" ]; then chown "$2" "$3"; fi
}

# -- users: byoc-agent (the service) and byoc-operators (who may approve commands) -------------
dir 0755 root:root /usr/lib/sysusers.d
put 0644 "$here/systemd/byoc-agent.sysusers.conf" "$root/usr/lib/sysusers.d/byoc-agent.conf"
if [ -z "$root" ]; then
    systemd-sysusers byoc-agent.conf
fi

# -- unit, directories, configuration ----------------------------------------------------------
dir 0755 root:root /etc/systemd/system
put 0644 "$here/systemd/byoc-agent.service" "$root/etc/systemd/system/byoc-agent.service"
# /etc/byoc-agent is root's; the agent reads its files through its group.
dir 0755 root:root /etc/byoc-agent
dir 0755 root:root /etc/byoc-agent/keys
# The unit's StateDirectory and LogsDirectory, made now because `byoc-agent enroll` runs before
# the first start and writes the key, certificate and CA bundle under /var/lib/byoc-agent/tls.
dir 0700 byoc-agent:byoc-agent /var/lib/byoc-agent
dir 0700 byoc-agent:byoc-agent /var/lib/byoc-agent/tls
dir 0750 byoc-agent:byoc-agent /var/log/byoc-agent
if [ "$driver" = systemd ]; then
    config="$here/systemd/ec2/agent.toml"
    dir 0755 root:root /etc/systemd/system/byoc-agent.service.d
    put 0644 "$here/systemd/ec2/byoc-agent-systemd-driver.conf" \
        "$root/etc/systemd/system/byoc-agent.service.d/systemd-driver.conf"
    put 0644 "$here/systemd/ec2/milvus-querynode@.service" \
        "$root/etc/systemd/system/milvus-querynode@.service"
    dir 0755 root:root /etc/polkit-1/rules.d
    put 0644 "$here/systemd/ec2/50-byoc-agent.rules" "$root/etc/polkit-1/rules.d/50-byoc-agent.rules"
    dir 0755 byoc-agent:byoc-agent /opt/milvus
    dir 0755 byoc-agent:byoc-agent /opt/milvus/releases
else
    config="$here/systemd/agent.toml"
fi
# Never overwrite what the customer has edited.
for pair in "$config:agent.toml" "$here/systemd/policy.toml:policy.toml"; do
    source=${pair%%:*}
    target="$root/etc/byoc-agent/${pair##*:}"
    if [ -e "$target" ]; then
        cmp -s "$source" "$target" || say "kept $target (edited; the shipped one is $source)"
    else
        install -m 0640 "$source" "$target"
        say "installed $target"
    fi
    if [ -z "$root" ] && [ "$(stat -c %U:%G "$target")" != root:byoc-agent ]; then
        chown root:byoc-agent "$target"
    fi
done

# -- the virtual environment -------------------------------------------------------------------
source_hash() {
    cd "$here"
    { find agent control_plane_stub certs byoc_demo -type f \( -name '*.py' -o -name py.typed \) |
        LC_ALL=C sort | xargs sha256sum; sha256sum pyproject.toml setup.py constraints.txt; } | sha256sum
}
if [ "$with_venv" = 1 ]; then
    stamp="$root$venv/.byoc-agent-source"
    wanted="$(source_hash) $("$python" -c 'import sys; print(sys.version)' | head -n1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        say "$root$venv is up to date"
    else
        "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
        "$python" -m venv "$root$venv"
        compile=
        [ -z "$root" ] || compile=--no-compile
        "$root$venv/bin/python" -m pip install --quiet --disable-pip-version-check $compile \
            -c "$here/constraints.txt" "$here[fast]"
        if [ -n "$root" ]; then
            # Staged: the scripts' shebangs, the activate scripts and pyvenv.cfg name the staging
            # path; make them name where the tree will live, and compile with that path too.
            grep -rlI -e "$root$venv" "$root$venv/bin" "$root$venv/pyvenv.cfg" |
                while IFS= read -r file; do sed -i "s|$root$venv|$venv|g" "$file"; done
            "$root$venv/bin/python" -m compileall -q -f -s "$root" "$root$venv/lib" >/dev/null
        fi
        printf '%s\n' "$wanted" >"$stamp"
        say "installed the agent into $root$venv"
    fi
    # `byoc-agent status`, `approve`, ... on every operator's PATH.
    [ -d "$root/usr/local/bin" ] || install -d -m 0755 "$root/usr/local/bin"
    if [ "$(readlink "$root/usr/local/bin/byoc-agent" 2>/dev/null)" != "$venv/bin/byoc-agent" ]; then
        ln -sfn "$venv/bin/byoc-agent" "$root/usr/local/bin/byoc-agent"
        say "linked $root/usr/local/bin/byoc-agent"
    fi
fi

if [ -n "$root" ]; then
    say "staged into $root (on the target: systemd-sysusers byoc-agent.conf; owners as above)"
    exit 0
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "done. Next (README \"On an EC2 host\"): edit /etc/byoc-agent/agent.toml, install the"
    say "vendor's CA bundle and command-signing key, enroll, then: systemctl enable --now byoc-agent"
else
    say "systemd is not running here: installed, not enabled"
fi
