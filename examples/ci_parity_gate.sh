#!/usr/bin/env bash
# CI parity gate: export MODEL, then `perch check` it against its reference; the build fails when the
# check fails. Exit codes are perch's: 0 pass, 1 fidelity/speed check failed, 2 bad input.
#
#   examples/ci_parity_gate.sh MODEL [--to onnx|coreml] [--quantize Q] [--precision fp32|fp16]
#                              [--reference MODEL] [--out DIR] [--report DIR] [--max-new-tokens N] [--no-export]
#
# --no-export checks the artifact already in --out (exported by an earlier CI step) instead of exporting.
# The report (report.md, report.json, plots) is written to --report whether the check passes or not, so
# the CI job can upload it either way (examples/ci/perch-parity.yml).
set -euo pipefail

usage() { sed -n '5,6p' "$0" | sed 's/^# *//' >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
model=$1; shift
to=onnx quantize=none dtype=fp32 reference="" out=build/perch-artifact report=build/perch-report new_tokens=8
export_it=1
while [[ $# -gt 0 ]]; do
  if [[ $1 == --no-export ]]; then export_it=0; shift; continue; fi
  [[ $# -ge 2 ]] || usage
  case $1 in
    --to) to=$2 ;;
    --quantize) quantize=$2 ;;
    --precision) dtype=$2 ;;
    --reference) reference=$2 ;;
    --out) out=$2 ;;
    --report) report=$2 ;;
    --max-new-tokens) new_tokens=$2 ;;
    *) usage ;;
  esac
  shift 2
done


if [[ $export_it == 1 ]]; then
  echo "== export $model -> $out ($to, $dtype, quantize=$quantize)"
  perch export "$model" --to "$to" --precision "$dtype" --quantize "$quantize" --out "$out" --overwrite
fi

echo "== perch check $out"
check=(perch check "$out" --report "$report" --max-new-tokens "$new_tokens")
[[ -n $reference ]] && check+=(--reference "$reference")
status=0
"${check[@]}" || status=$?
echo "== parity gate: $([[ $status == 0 ]] && echo PASS || echo "FAIL (perch check exit $status)"); report in $report"
exit "$status"
