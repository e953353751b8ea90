# Shared by the launch scripts: `run CMD...` prints the command (shell-quoted) with
# --dry-run, and runs it otherwise. Scripts set DRY_RUN=1 when given --dry-run.
PYTHON=${PYTHON:-python3}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}
