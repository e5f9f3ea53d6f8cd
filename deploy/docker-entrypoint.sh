#!/bin/sh
# The container's entry point: on first start make the software card in the
# data volume (sealed under the passphrase given as a secret), then run the
# center in the foreground as PID 1's child (signals reach it through exec).
#
#   MICROCERT_PASSPHRASE_FILE  a file whose first line is the card's passphrase
#                              (a Docker/Kubernetes secret); or
#   MICROCERT_PASSPHRASE       the passphrase itself (less safe: visible in the
#                              container's environment)
#   MICROCERT_DATA             the data directory (default /var/lib/microcert)
#   MICROCERT_DATABASE         postgres://... to share a database between centers
#   MICROCERT_HTTP, MICROCERT_COAP   listen addresses (default 0.0.0.0:8080, 0.0.0.0:5683)
#   MICROCERT_CARD_FROM        on first start, import the card from this `card clone`
#                              export instead of making one (a second center of
#                              the same deployment); its passphrase in
#                              MICROCERT_EXPORT_PASSPHRASE_FILE or MICROCERT_EXPORT_PASSPHRASE
#   MICROCERT_BIN              the binary (default: microcert on PATH; for tests)
#
# Any arguments replace `serve` (e.g. `token create --role operator --name ops`).
set -eu
# Files the center makes (card, database, anchor, backups) are its own.
umask 077

BIN=${MICROCERT_BIN:-microcert}
export MICROCERT_DATA="${MICROCERT_DATA:-/var/lib/microcert}"
export MICROCERT_HTTP="${MICROCERT_HTTP:-0.0.0.0:8080}"
export MICROCERT_COAP="${MICROCERT_COAP:-0.0.0.0:5683}"

PASS_FILE=""
if [ -n "${MICROCERT_PASSPHRASE_FILE:-}" ]; then
    if [ ! -r "$MICROCERT_PASSPHRASE_FILE" ]; then
        echo "microcert: MICROCERT_PASSPHRASE_FILE=$MICROCERT_PASSPHRASE_FILE cannot be read" >&2
        exit 2
    fi
    PASS_FILE=$MICROCERT_PASSPHRASE_FILE
elif [ -z "${MICROCERT_PASSPHRASE:-}" ] && [ -z "${MICROCERT_PKCS11:-}" ]; then
    echo "microcert: set MICROCERT_PASSPHRASE_FILE (a secret) or MICROCERT_PASSPHRASE: the card's keys are sealed under it" >&2
    exit 2
fi

# `card init` with the passphrase file (every path stays one argument).
card_init() {
    if [ -n "$PASS_FILE" ]; then
        "$BIN" card init --passphrase-file "$PASS_FILE" "$@"
    else
        "$BIN" card init "$@"
    fi
}

mkdir -p -m 0700 "$MICROCERT_DATA"
if [ ! -e "$MICROCERT_DATA/card.mccard" ] && [ -z "${MICROCERT_PKCS11:-}" ]; then
    if [ -n "${MICROCERT_CARD_FROM:-}" ]; then
        echo "microcert: first start, importing the card from $MICROCERT_CARD_FROM" >&2
        if [ -n "${MICROCERT_EXPORT_PASSPHRASE_FILE:-}" ]; then
            card_init --from "$MICROCERT_CARD_FROM" \
                --export-passphrase-file "$MICROCERT_EXPORT_PASSPHRASE_FILE" >&2
        else
            card_init --from "$MICROCERT_CARD_FROM" >&2
        fi
    else
        echo "microcert: first start, making the card in $MICROCERT_DATA" >&2
        card_init >&2
    fi
fi

# The export passphrase is needed only by the first start's import.
unset MICROCERT_EXPORT_PASSPHRASE

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    # No command, or only options: serve with them.
    if [ -n "$PASS_FILE" ]; then
        set -- --passphrase-file "$PASS_FILE" "$@"
    fi
    exec "$BIN" serve "$@"
fi
# A command of its own (token create, backup, ...): run it as given.
exec "$BIN" "$@"
