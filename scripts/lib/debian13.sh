# Sourced by the Debian 13 jobs (test-debian13.sh, check-cuda-build.sh): a minimal Debian 13 ("trixie") root made
# with debootstrap, cached outside the clone so that the next run starts in seconds, and helpers to run in it.
#   ACCELERATED_CACHE_DIR  where roots and downloaded headers are kept (default /var/cache/accelerated)
#   DEBIAN13_MIRROR        the Debian mirror (default: the one this machine's apt uses, else deb.debian.org)
# Needs root (debootstrap, chroot, mount).

ACCELERATED_CACHE_DIR=${ACCELERATED_CACHE_DIR:-/var/cache/accelerated}

debian13_mirror() {
  if [[ -n ${DEBIAN13_MIRROR:-} ]]; then echo "$DEBIAN13_MIRROR"; return; fi
  local uri
  uri=$(sed -n 's/^URIs: *\([^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
  [[ -n $uri ]] || uri=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
  echo "${uri:-http://deb.debian.org/debian}"
}

# Runs a command line inside ROOT with /proc and /dev mounted (unmounted again when it returns). TMPDIR is unset:
# a host TMPDIR that does not exist inside the root breaks package scripts.
debian13_run() {
  local root=$1
  shift
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  mountpoint -q "$root/dev" || { mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"; }
  local status=0
  env -u TMPDIR -u CCACHE_DIR HOME=/root chroot "$root" /bin/bash -lc "$*" || status=$?
  debian13_unmount "$root"
  return $status
}

debian13_unmount() {
  local root=$1
  mountpoint -q "$root/dev" && umount -R -l "$root/dev"
  mountpoint -q "$root/proc" && umount -l "$root/proc"
  return 0
}

# Makes (once) the root NAME under the cache with this checkout's install-deps.sh run in it, and prints its path.
# The root is rebuilt when install-deps.sh changes; it is built under a temporary name and renamed when complete,
# so an interrupted build is never taken for a finished one.
debian13_root() {
  local name=$1 source_dir=$2
  local root=$ACCELERATED_CACHE_DIR/$name
  local stamp
  stamp=$(sha256sum "$source_dir/scripts/install-deps.sh" | cut -c1-16)
  if [[ -f $root/.accelerated-root && $(cat "$root/.accelerated-root") == "$stamp" ]]; then
    echo "$root"
    return
  fi
  command -v debootstrap >/dev/null || {
    echo "Installing debootstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2 ||
      { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2; }
  }
  local mirror building=$root.building
  mirror=$(debian13_mirror)
  mkdir -p "$ACCELERATED_CACHE_DIR"
  debian13_remove "$building"
  debian13_remove "$root"
  echo "Making the Debian 13 root $root from $mirror (once; about 3 minutes)" >&2
  debootstrap --variant=minbase trixie "$building" "$mirror" >&2
  echo "deb $mirror trixie main contrib non-free" >"$building/etc/apt/sources.list"
  cp /etc/resolv.conf "$building/etc/resolv.conf"
  mkdir -p "$building/src"
  cp "$source_dir/scripts/install-deps.sh" "$building/src/install-deps.sh"
  debian13_run "$building" 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends git && /src/install-deps.sh && apt-get clean' >&2
  echo "$stamp" >"$building/.accelerated-root"
  mv "$building" "$root"
  echo "$root"
}

# Deletes a root safely: never through a live bind mount of /dev.
debian13_remove() {
  local root=$1
  [[ -d $root ]] || return 0
  debian13_unmount "$root"
  if mountpoint -q "$root/dev" || mountpoint -q "$root/proc"; then
    echo "refusing to delete $root: /dev or /proc is still mounted in it" >&2
    return 1
  fi
  rm -rf --one-file-system "$root"
}

# Copies this checkout's files (tracked, and untracked ones git does not ignore) into ROOT/src/accelerated. Its
# build folders stay, so ccache and CMake rebuild only what changed.
debian13_copy_checkout() {
  local root=$1 source_dir=$2
  local dest=$root/src/accelerated
  mkdir -p "$dest"
  find "$dest" -mindepth 1 -maxdepth 1 ! -name 'build' ! -name 'build-*' -exec rm -rf {} +
  (cd "$source_dir" && git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$dest" -xf -
}

# The start of each Debian 13 job (NAME names it in messages): checks for root, makes or finds the cached root, and
# sets `root` and a trap that unmounts it on exit.
debian13_start() {
  local name=$1
  [[ $(id -u) -eq 0 ]] || { echo "$name: run it as root (debootstrap and chroot need it)"; exit 1; }
  root=$(debian13_root debian13 "$PWD")
  trap 'debian13_unmount "$root"' EXIT
}
