# Sourced by the experiment runners' smoke runs.
# test_subset OUT PER_CLASS: links the first PER_CLASS images of each CIFAR-10 test class under
# OUT (once), so a smoke run's evaluations take seconds instead of scoring 10,000 images.
test_subset() {
  local out=$1 per_class=$2 class_dir class f
  if [[ -f "$out/.complete" ]]; then return; fi
  rm -rf "$out"
  for class_dir in data/cifar10/test/*/; do
    class=$(basename "$class_dir")
    mkdir -p "$out/$class"
    mapfile -t files < <(find "$class_dir" -maxdepth 1 -type f | sort)
    for f in "${files[@]:0:$per_class}"; do ln -s "$PWD/$f" "$out/$class/"; done
  done
  touch "$out/.complete"
}
