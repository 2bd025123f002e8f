#!/bin/sh
# Install the BYOC agent on a host (an EC2 instance with systemd): the service user, the unit,
# the directories, a virtual environment with the agent, and a configuration to edit.
#
#   sudo scripts/install-host.sh                 # onto this host
#   DESTDIR=/tmp/stage scripts/install-host.sh   # into a staging tree (packaging, tests)
#   DRIVER=systemd sudo scripts/install-host.sh  # also the systemd driver's polkit rule,
#                                                # drop-in and /opt/milvus
#
# Nothing is enabled or started when DESTDIR is set or systemd is not running; otherwise the
# unit is installed and `systemctl daemon-reload` run, and the next steps are printed.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
driver=${DRIVER:-process}
python=${PYTHON:-python3}

install -d -m 0755 "$root/etc/byoc-agent" "$root/etc/byoc-agent/keys"
install -d -m 0755 "$root/etc/systemd/system" "$root/usr/lib/sysusers.d"
install -m 0644 "$here/systemd/byoc-agent.service" "$root/etc/systemd/system/byoc-agent.service"
install -m 0644 "$here/systemd/byoc-agent.sysusers.conf" "$root/usr/lib/sysusers.d/byoc-agent.conf"
if [ "$driver" = systemd ]; then
    config="$here/systemd/ec2/agent.toml"
    install -d -m 0755 "$root/etc/systemd/system/byoc-agent.service.d" "$root/etc/polkit-1/rules.d"
    install -m 0644 "$here/systemd/ec2/byoc-agent-systemd-driver.conf" \
        "$root/etc/systemd/system/byoc-agent.service.d/systemd-driver.conf"
    install -m 0644 "$here/systemd/ec2/50-byoc-agent.rules" "$root/etc/polkit-1/rules.d/50-byoc-agent.rules"
    install -m 0644 "$here/systemd/ec2/milvus-querynode@.service" "$root/etc/systemd/system/"
    install -d -m 0755 "$root/opt/milvus/releases"
else
    config="$here/systemd/agent.toml"
fi
# Configuration: never overwrite what the customer has edited.
[ -e "$root/etc/byoc-agent/agent.toml" ] || install -m 0640 "$config" "$root/etc/byoc-agent/agent.toml"
[ -e "$root/etc/byoc-agent/policy.toml" ] || install -m 0640 "$here/systemd/policy.toml" "$root/etc/byoc-agent/policy.toml"

if [ -z "$root" ] || [ "${WITH_VENV:-0}" = 1 ]; then
    "$python" -m venv "$root/opt/byoc-agent"
    "$root/opt/byoc-agent/bin/pip" install --quiet "$here[fast]"
fi

if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers ${root:+--root="$root"} byoc-agent.conf
fi
if [ -n "$root" ]; then
    echo "staged into $root"
    exit 0
fi
chgrp byoc-agent /etc/byoc-agent/agent.toml /etc/byoc-agent/policy.toml
[ "$driver" = systemd ] && chown -R byoc-agent:byoc-agent /opt/milvus
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "next: put the CA bundle and keys in place, edit /etc/byoc-agent/agent.toml, then"
    echo "  sudo -u byoc-agent /opt/byoc-agent/bin/byoc-agent enroll --config /etc/byoc-agent/agent.toml --control-plane https://... --token -"
    echo "  systemctl enable --now byoc-agent"
else
    echo "systemd is not running here: installed, not enabled"
fi
