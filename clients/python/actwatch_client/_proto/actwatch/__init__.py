"""Generated code: see scripts/gen_stubs.sh."""
