#!/usr/bin/env bash
# Set up a development or CI machine (Debian 12, as root) for p2pcast.
#
# Idempotent: when everything is already there it only checks, in seconds.
#   1. Debian packages (apt-get update + install only if one is missing)
#   2. a virtualenv at .venv from Debian's /usr/bin/python3 (3.11), with
#      --system-site-packages so Debian's python3-rados can be used later
#   3. pip install -e '.[test,bench]' (skipped while the stamp file is newer
#      than pyproject.toml)
#   4. check that Debian's python3-rados imports in the venv (the RADOS origin
#      and tools/ceph.py need it), linking it in if it does not
#   5. the unprivileged test user p2pcast-test (Slurm end-to-end tests), if absent
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

APT_PACKAGES=(
    # Python: venv for .venv, headers and a compiler for any dependency
    # that has no wheel for this platform
    python3-venv python3-dev gcc
    # Image staging: build, check and mount SquashFS images; unpack tarballs
    squashfs-tools squashfuse fuse3 zstd tar gzip
    # Network namespaces (ip netns, veth) for the multi-host tests, and
    # nftables for packet loss on emulated links (this kernel has no netem)
    iproute2 nftables
    # The cluster benchmark's reference methods: HTTP pull and a relay chain
    curl netcat-openbsd
    # ... and BitTorrent: aria2c peers and a tracker
    aria2 opentracker
    # A real single-node Ceph (tools/ceph.py): monitor, OSDs, radosgw (S3),
    # the admin tools, and librados for Python (the RADOS origin)
    ceph-mon ceph-osd radosgw ceph-common python3-rados
    # A real multi-node Slurm (tools/slurm.py): munge, the daemons, the clients,
    # slurm/spank.h for the SPANK plugin; Charliecloud's ch-run and mmdebstrap
    # for the end-to-end tests' container images; nsenter/unshare
    slurmctld slurmd slurm-client munge libslurm-dev charliecloud-runtime mmdebstrap
    util-linux
)

# The unprivileged user that submits jobs in the end-to-end tests (tools/slurm.py's
# TEST_USER): a system user with a home directory, shared by every emulated node.
TEST_USER=p2pcast-test

PYTHON=/usr/bin/python3
VENV=$ROOT/.venv
STAMP=$VENV/.p2pcast-installed

say() { printf 'setup: %s\n' "$*"; }

# ---- 1. Debian packages ------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if ((EUID != 0)); then
        say "missing Debian packages: ${missing[*]}"
        say "run as root: apt-get install -y --no-install-recommends ${missing[*]}"
        exit 1
    fi
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    say "Debian packages: all ${#APT_PACKAGES[@]} installed"
fi

# ---- 2. virtualenv -----------------------------------------------------------
# A venv made by another Python (pyenv's, say) or without the system site
# packages is rebuilt: the project targets Debian's 3.11 and python3-rados.
venv_ok() {
    [[ -x $VENV/bin/python && -f $VENV/pyvenv.cfg ]] &&
        grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" &&
        grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg"
}
if ! venv_ok; then
    if [[ -e $VENV ]]; then
        say "removing .venv (not made from $PYTHON with --system-site-packages)"
        rm -rf "$VENV"
    fi
    say "creating .venv from $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
else
    say ".venv: present ($("$VENV/bin/python" --version 2>&1))"
fi

# ---- 3. the project and its test/bench extras ----------------------------------
if [[ -f $STAMP && $STAMP -nt $ROOT/pyproject.toml ]]; then
    say "pip install: up to date (stamp newer than pyproject.toml)"
else
    say "pip install -e '.[test,bench]'"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,bench]"
    touch "$STAMP"
fi
# ---- 4. librados for Python ------------------------------------------------------
# Debian ships it as one extension module for its own CPython 3.11; a venv
# made with --system-site-packages sees it. If it does not (a venv made some
# other way), linking that one file into the venv is enough.
RADOS_SO=$(ls /usr/lib/python3/dist-packages/rados.cpython-311-*.so 2>/dev/null | head -n1 || true)
if "$VENV/bin/python" -c 'import rados' 2>/dev/null; then
    say "python3-rados: imports in .venv"
elif [[ -n $RADOS_SO ]]; then
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ln -sf "$RADOS_SO" "$SITE/"
    "$VENV/bin/python" -c 'import rados' && say "python3-rados: linked into .venv"
else
    say "python3-rados: not installed (apt-get install python3-rados)"
    exit 1
fi
# ---- 5. the test user ------------------------------------------------------------
if id -u "$TEST_USER" >/dev/null 2>&1; then
    say "test user $TEST_USER: present"
elif ((EUID != 0)); then
    say "test user $TEST_USER missing: run this script as root to create it"
else
    useradd --system --create-home --home-dir "/home/$TEST_USER" --shell /bin/bash \
        --comment "p2pcast end-to-end tests" "$TEST_USER"
    say "test user $TEST_USER: created"
fi
say "done: activate with 'source .venv/bin/activate'"
