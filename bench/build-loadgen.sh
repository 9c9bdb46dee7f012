#!/usr/bin/env bash
# Builds bench/.bin/loadgen, the Go load generator, from Debian's Go toolchain
# and grpc-go sources in GOPATH mode: this machine reaches no Go module proxy,
# but Debian's packages install like any other. Its HTTP mode (bench/loadgen/http.go)
# uses Go's standard library only.
set -euo pipefail
cd "$(dirname "$0")/.."
GOPATH_DEBIAN=/usr/share/gocode
if ! command -v go >/dev/null || [ ! -d "$GOPATH_DEBIAN/src/google.golang.org/grpc" ]; then
    echo "installing Debian's golang-go and golang-google-grpc-dev"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go golang-google-grpc-dev >/dev/null
fi
mkdir -p bench/.bin
GO111MODULE=off GOPATH="$GOPATH_DEBIAN" GOCACHE="${GOCACHE:-/tmp/llm-gateway-gocache}" \
    go build -o bench/.bin/loadgen ./bench/loadgen
echo "built bench/.bin/loadgen"
