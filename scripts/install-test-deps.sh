#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (as root): the
# Debian packages of the real peers and clients, the Python test extras, nodemailer.
# README's test command (and .ci/run) is: bash scripts/install-test-deps.sh && python3 -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
APT_PACKAGES=(swaks libnet-ssleay-perl msmtp curl ca-certificates dnsmasq-base opendkim-tools
    postfix sasl2-bin libsasl2-modules dovecot-core dovecot-lmtpd haproxy)
missing=()
# Node.js and npm (for nodemailer) come with this kind of machine; Debian's otherwise.
command -v npm >/dev/null || missing+=(nodejs npm)
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    # Postfix is a test peer only: "No configuration" sets up no system mail at all.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q -e '.[test]'
if [ -f tests/interop/node/package-lock.json ]; then
    npm ci --prefix tests/interop/node --no-audit --no-fund --loglevel=error
fi
