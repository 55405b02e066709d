# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): --dry-run and quoting.
#   DRY_RUN=1  print each command, quoted so it can be pasted into a shell, instead of running it

DRY_RUN=${DRY_RUN:-0}

# quote ARGS...: the arguments as one shell-quoted string (printf %q; an argument that needs
# quoting is single-quoted, for legibility), for a remote command line or a printed one
quote() {
  local out="" arg q
  for arg in "$@"; do
    printf -v q '%q' "$arg"
    [[ $q == "$arg" ]] || q=${arg@Q}
    out+="${out:+ }$q"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: run it, or under DRY_RUN=1 print it quoted
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

# die MESSAGE: one line on stderr, exit 2
die() {
  printf '%s: error: %s\n' "${0##*/}" "$1" >&2
  exit 2
}
