# Sourced by tools/demo.sh and tools/check.sh: install the Debian packages the build needs,
# only those that are missing. Elsewhere, say what is needed and go on (the build will tell).
moerun_deps() {
    local pkgs=(gcc make cmake pkg-config liburing-dev libhwloc-dev libcmocka-dev
                libjemalloc-dev "$@")
    if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        echo "deps: not a Debian system; make sure these are installed: ${pkgs[*]}" >&2
        return 0
    fi
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || {
            echo "deps: missing ${missing[*]}; run as root or install them" >&2
            return 1
        }
        sudo=(sudo)
    fi
    echo "deps: installing ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
}
