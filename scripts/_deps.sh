# Sourced by quickstart.sh and test.sh: pip installs that never replace the installed torch
# (a plain `pip install` of ComfyUI's or diffusers' requirements can pull a multi-GB CUDA torch).
PY=${PYTHON:-python3}
DEPS_CACHE=${COMFYUI_INVERSE_CACHE:-$HOME/.cache/comfyui-inverse}
mkdir -p "$DEPS_CACHE"

torch_constraints() {
  local f="$DEPS_CACHE/constraints.txt" v
  if ! v=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
    echo "[deps] no torch found: installing torch==2.13.0" >&2
    "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0" >&2
    v=2.13.0
  fi
  printf 'torch==%s\n' "$v" > "$f"
  echo "$f"
}

# pip_install_reqs FILE...: install requirement files under the torch constraint, once per content
pip_install_reqs() {
  local c stamp
  c=$(torch_constraints)
  stamp="$DEPS_CACHE/deps-$(cat "$c" "$@" | sha1sum | cut -c1-16)"
  if [ -f "$stamp" ]; then return 0; fi
  echo "[deps] installing $* (torch pinned: $(cat "$c"))" >&2
  "$PY" -m pip install -q --disable-pip-version-check -c "$c" $(printf -- '-r %s ' "$@") >&2
  touch "$stamp"
}

# comfyui_reqs DIR: ComfyUI's requirements without torch itself and torchaudio (no CPU build
# of torchaudio exists for every torch; only ComfyUI's audio nodes need it)
comfyui_reqs() {
  local out="$DEPS_CACHE/comfyui-requirements.txt"
  grep -v -E '^\s*(torch|torchaudio)\s*($|[<>=~!;#])' "$1/requirements.txt" > "$out"
  echo "requests" >> "$out"
  echo "$out"
}
