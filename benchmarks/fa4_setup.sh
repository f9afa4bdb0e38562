# Sourced, not run (". benchmarks/fa4_setup.sh"): makes FlashAttention-4 importable on a machine
# without network, from the wheels that shared/tools/fa4_wheels.sh downloads and splits into two
# folders, each small enough to travel with one call: .fa4a/ (part_aa of the CUTLASS DSL libs wheel
# and the other wheels) and .fa4b/ (part_ab). A call that carries either folder stashes it in
# $FA4_STASH, which outlives the call while the machine stays up; once both halves are there they
# are joined and every wheel is installed into $FA4_TARGET; every later call only extends
# PYTHONPATH. Without the wheels it does nothing, and the fa4 peer reports itself unavailable.
FA4_STASH=${FA4_STASH:-/root/fa4}
FA4_TARGET=${FA4_TARGET:-/tmp/fa4}
FA4_BIG_WHEEL=${FA4_BIG_WHEEL:-nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl}

fa4_setup() {
    for half in .fa4a .fa4b; do
        if [ -d "$half" ]; then
            mkdir -p "$FA4_STASH" && cp -n "$half"/* "$FA4_STASH"/ 2>/dev/null
        fi
    done
    if [ ! -f "$FA4_TARGET/.installed" ]; then
        if [ ! -f "$FA4_STASH/part_aa" ] || [ ! -f "$FA4_STASH/part_ab" ]; then
            echo "fa4_setup: both halves not here yet (stash $FA4_STASH: $(ls "$FA4_STASH" 2>/dev/null | wc -l) files); FA4 not installed"
            return 0
        fi
        cat "$FA4_STASH/part_aa" "$FA4_STASH/part_ab" > "$FA4_STASH/$FA4_BIG_WHEEL"
        # --no-deps: the wheels are the whole dependency set; torch and numpy are already there
        python3 -m pip install -q --no-index --no-deps --target "$FA4_TARGET" "$FA4_STASH"/*.whl \
            && touch "$FA4_TARGET/.installed" \
            || { echo "fa4_setup: pip install failed; FA4 not installed"; return 0; }
    fi
    # The CUTLASS DSL keeps its Python packages one level down, under dsl_packages
    export PYTHONPATH="$FA4_TARGET:$FA4_TARGET/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
    echo "fa4_setup: FA4 from $FA4_TARGET"
}
fa4_setup
