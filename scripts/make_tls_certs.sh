#!/usr/bin/env bash
# Certificates for the TLS compose variant (docker-compose.tls.yml), made with openssl alone.
# Usage: scripts/make_tls_certs.sh [DIR [NAME...]]
#   DIR   where they go; default tls/ at the repository root, where docker-compose.tls.yml looks for them
#         (CONVEYOR_TLS_DIR). A new DIR is made 0700; a new or empty one gets a .gitignore of "*", so that no
#         key is committed.
#   NAME  a further DNS name or IP address clients dial the server by (e.g. the host's name), besides
#         localhost, 127.0.0.1 and the compose service names server, server-1, server-2 and nginx.
# Writes, keys 0600 and certificates 0644 (P-256 keys):
#   ca.pem, ca.key          a CA of its own (10 years) that signs the two below: clients trust ca.pem
#   server.pem, server.key  the server's certificate (825 days) for those names; it can also authenticate as a
#                           client, which the compose health check does under mutual TLS
#   client.pem, client.key  a client certificate (825 days), for mutual TLS
# Never overwrites: a DIR that already holds all six files is checked (chains, key pairs, every NAME asked for,
# not expired) and kept as it is, so running it again is harmless; a DIR holding only some of them is refused.
# New certificates: remove DIR (or give another), run again, and recreate the server (it reads them at start):
# `docker compose -f docker-compose.yml -f docker-compose.tls.yml up -d --force-recreate server`.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/tls}"
if (($#)); then shift; fi
names=(localhost 127.0.0.1 server server-1 server-2 nginx "$@")
files=(ca.pem ca.key server.pem server.key client.pem client.key)
ca_days=3650
leaf_days=825 # the longest validity macOS and iOS accept for a server certificate, whoever signed it

die() {
    printf 'make_tls_certs: %s\n' "$*" >&2
    exit 1
}

is_ip() { [[ "$1" =~ ^[0-9]+(\.[0-9]+){3}$ || "$1" == *:* ]]; }

subject_alt_names() {
    local name entries=()
    for name in "${names[@]}"; do
        if is_ip "$name"; then
            entries+=("IP:$name")
        else
            entries+=("DNS:$name")
        fi
    done
    (
        IFS=,
        printf '%s' "${entries[*]}"
    )
}

# Succeeds when server.pem in $1 chains to ca.pem and is valid for every name, and client.pem chains to ca.pem.
verify_set() {
    local name check
    for name in "${names[@]}"; do
        check=(-verify_hostname "$name")
        is_ip "$name" && check=(-verify_ip "$name")
        openssl verify -CAfile "$1/ca.pem" -purpose sslserver "${check[@]}" "$1/server.pem" >/dev/null 2>&1 ||
            die "$1/server.pem is not valid for '$name' (made for other names, or not signed by $1/ca.pem):" \
                "remove its files and run again"
    done
    openssl verify -CAfile "$1/ca.pem" -purpose sslclient "$1/server.pem" "$1/client.pem" >/dev/null 2>&1 ||
        die "$1/server.pem or $1/client.pem does not verify against $1/ca.pem as a client certificate"
    for name in ca server client; do
        [[ "$(openssl x509 -in "$1/$name.pem" -noout -pubkey)" == "$(openssl pkey -in "$1/$name.key" -pubout)" ]] ||
            die "$1/$name.key is not the key of $1/$name.pem"
    done
}

keep_existing_set() {
    verify_set "$dir"
    local name
    for name in ca server client; do
        openssl x509 -in "$dir/$name.pem" -noout -checkend 0 >/dev/null ||
            die "$dir/$name.pem has expired: remove $dir and run again"
        openssl x509 -in "$dir/$name.pem" -noout -checkend $((30 * 86400)) >/dev/null ||
            printf 'make_tls_certs: warning: %s expires within 30 days\n' "$dir/$name.pem" >&2
        [[ "$(stat -c %a "$dir/$name.key")" == 600 ]] ||
            printf 'make_tls_certs: warning: %s is mode %s, not 0600\n' "$dir/$name.key" \
                "$(stat -c %a "$dir/$name.key")" >&2
    done
    printf '%s already holds a CA, a server and a client certificate that verify: nothing written\n' "$dir"
}

write_config() { # file
    cat >"$1" <<EOF
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $(subject_alt_names)
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
}

make_set() { # directory
    local out="$1" config="$1/openssl.cnf" name
    local key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    write_config "$config"
    openssl req -x509 -config "$config" -extensions ca "${key[@]}" -keyout "$out/ca.key" -out "$out/ca.pem" \
        -days "$ca_days" -subj "/CN=Conveyor compose CA" 2>/dev/null
    for name in server client; do
        openssl req -new -config "$config" "${key[@]}" -keyout "$out/$name.key" -out "$out/$name.csr" \
            -subj "/CN=conveyor-$name" 2>/dev/null
        openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
            -set_serial "0x$(openssl rand -hex 16)" -days "$leaf_days" -extfile "$config" -extensions "$name" \
            -out "$out/$name.pem" 2>/dev/null
    done
    chmod 0600 "$out"/*.key
    chmod 0644 "$out"/*.pem
    verify_set "$out"
}

print_usage() {
    local shown="$dir" env=""
    [[ "$dir" == "$root/tls" ]] || env="CONVEYOR_TLS_DIR=$dir "
    [[ "$dir" == "$root/"* ]] && shown="${dir#"$root/"}"
    cat <<EOF
wrote $dir:
  ca.pem      the CA (until $(openssl x509 -in "$dir/ca.pem" -noout -enddate | cut -d= -f2)): clients trust it
  ca.key      its key (0600): keep it off the servers; it signs any further certificate
  server.pem  the server's certificate (until $(openssl x509 -in "$dir/server.pem" -noout -enddate | cut -d= -f2))
              for $(subject_alt_names)
  server.key  its key (0600)
  client.pem  a client certificate, for mutual TLS
  client.key  its key (0600)
TLS (from the repository root):
  ${env}docker compose -f docker-compose.yml -f docker-compose.tls.yml up -d
  conveyor stream --target 127.0.0.1:50051 --ca $shown/ca.pem story.txt
mutual TLS: the same with the server told to ask clients for a certificate, and a client presenting one:
  ${env}CONVEYOR_TLS_CLIENT_CA=/tls/ca.pem docker compose -f docker-compose.yml -f docker-compose.tls.yml up -d
  conveyor stream --target 127.0.0.1:50051 --ca $shown/ca.pem --cert $shown/client.pem --key $shown/client.key story.txt
without compose:
  conveyor serve --model artifacts/language --tls-cert $shown/server.pem --tls-key $shown/server.key [--tls-client-ca $shown/ca.pem]
EOF
}

command -v openssl >/dev/null || die "openssl is not installed (apt-get install -y openssl)"
for name in "${names[@]}"; do
    [[ "$name" =~ ^[A-Za-z0-9.:-]+$ ]] || die "'$name' is neither a DNS name nor an IP address"
done

present=() missing=()
for name in "${files[@]}"; do
    if [[ -e "$dir/$name" ]]; then present+=("$name"); else missing+=("$name"); fi
done
if ((${#missing[@]} == 0)); then
    keep_existing_set
    exit 0
fi
((${#present[@]} == 0)) ||
    die "$dir holds ${present[*]} but not ${missing[*]}: refusing to mix certificates; remove them or give another DIR"

umask 077
# A new or empty DIR (docker makes an empty one when compose ran before this script) keeps itself out of git.
mkdir -p "$dir"
[[ -n "$(ls -A "$dir")" ]] || printf '*\n' >"$dir/.gitignore"
dir="$(cd "$dir" && pwd)"
# Made beside the destination and moved in only once they verify: an interrupted run leaves no partial set.
staging="$(mktemp -d "$dir/.make_tls_certs.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
make_set "$staging"
for name in "${files[@]}"; do
    mv "$staging/$name" "$dir/$name"
done
print_usage
