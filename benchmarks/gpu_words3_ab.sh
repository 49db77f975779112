#!/bin/bash
# Session 21: GPU A/B of 3-bit codes as contiguous words (cache.WORDS3) against the bit planes, with the
# 2- and 4-bit neighbours in the same run. Output under $OUT (or benchmarks/results/words3_ab).
set -u
export PYTHONPATH=$PWD/src
O=${OUT:-benchmarks/results/words3_ab}; mkdir -p $O
A=benchmarks/ab_decode_variants.py
S=64x4096,1x131072
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } > $O/env.txt 2>&1
run() { local t=$1 f=$2; shift 2; echo "## $*" >> $O/$f.txt; timeout $t python $A "$@" 2>&1 | grep --line-buffered -v Warning | tee -a $O/$f.txt; }
run 140 g32_keys --group 32 --pairs 32,33,34 --shapes $S --variants '[{}, {"key_words": true}]'
run 80 g32_neighbours --group 32 --pairs 22,42,44,24 --shapes $S --variants '[{}]'
run 110 g32_values --group 32 --pairs 43,23 --shapes $S --variants '[{}, {"value_words": true}]'
run 50 g32_values --group 32 --pairs 33 --shapes $S --variants '[{"key_words": true, "value_words": true}]'
run 80 g128_keys --pairs 32,33,34 --shapes 64x4096 --variants '[{"token_block": 128}, {"token_block": 128, "key_words": true}]'
run 50 g128_neighbours --pairs 22,24 --shapes 64x4096 --variants '[{"token_block": 128}]'
run 50 g128_neighbours --pairs 42,44 --shapes 64x4096 --variants '[{"token_block": 128, "key_words": true}]'
