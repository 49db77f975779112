#!/bin/bash
# Session 21: launch variants at G = 32 for the 3-bit pairs still above a neighbour with contiguous words
# (K3V2 and K2V3 at 64 x 4k, KV3 at 1 x 128k). Output under $OUT (or benchmarks/results/words3_tune).
set -u
export PYTHONPATH=$PWD/src
O=${OUT:-benchmarks/results/words3_tune}; mkdir -p $O
A=benchmarks/ab_decode_variants.py
run() { local t=$1; shift; echo "## $*" >> $O/tune.txt; timeout $t python $A "$@" 2>&1 | grep --line-buffered -v Warning | tee -a $O/tune.txt; }
K='"key_words": true'; V='"value_words": true'
run 100 --group 32 --pairs 32 --shapes 64x4096 --variants "[{$K}, {$K, \"splits_per_sm\": 4}, {$K, \"num_stages\": 2}, {$K, \"maxnreg\": 128}, {$K, \"maxnreg\": 128, \"splits_per_sm\": 4}]"
run 100 --group 32 --pairs 23 --shapes 64x4096 --variants "[{$V}, {$V, \"splits_per_sm\": 8}, {$V, \"num_stages\": 2}, {$V, \"maxnreg\": 128}, {$V, \"maxnreg\": 128, \"splits_per_sm\": 8}]"
run 100 --group 32 --pairs 33 --shapes 1x131072 --variants "[{$K, $V}, {$K, $V, \"splits_per_sm\": 6}, {$K, $V, \"splits_per_sm\": 2}, {$K, $V, \"num_stages\": 2}, {$K, $V, \"maxnreg\": 128, \"splits_per_sm\": 4}]"
run 60 --group 32 --pairs 22,44 --shapes 64x4096,1x131072 --variants '[{}]'
