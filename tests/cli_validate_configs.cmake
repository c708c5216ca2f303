# Every shipped recipe (not the _base_ pieces) and every point of every sweep validates; a broken one fails with file and JSON path.
# Fashion-MNIST is installed by scripts/setup.sh; without it this test fails rather than skipping recipes.
# The recipes read ${ISP_FMNIST_ROOT:-/usr/share/datasets/fashion-mnist} (configs/_base_/datasets/fmnist.json).
set(fmnist /usr/share/datasets/fashion-mnist)
if(DEFINED ENV{ISP_FMNIST_ROOT} AND NOT "$ENV{ISP_FMNIST_ROOT}" STREQUAL "")
  set(fmnist $ENV{ISP_FMNIST_ROOT})
endif()
if(NOT EXISTS ${fmnist}/train-images-idx3-ubyte.gz AND NOT EXISTS ${fmnist}/train-images-idx3-ubyte)
  message(FATAL_ERROR "Fashion-MNIST is not in ${fmnist}: scripts/setup.sh installs dataset-fashion-mnist (or set ISP_FMNIST_ROOT)")
endif()
# configs/isp/quick_imagefolder.json reads an image folder: a tiny one made by the script its description names.
find_program(PYTHON3 python3 REQUIRED)
set(folder ${CMAKE_CURRENT_BINARY_DIR}/validate_imagefolder)
execute_process(COMMAND ${PYTHON3} ${CONFIGS}/../scripts/make_fmnist_imagefolder.py ${folder} --size 32 --train-per-class 3
                        --test-per-class 2 RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "scripts/make_fmnist_imagefolder.py failed (${rc}): ${out}${err}")
endif()
set(ENV{ISP_IMAGEFOLDER_ROOT} ${folder})
# ImageNet's layout names the held-out folder val/ (configs/isp/resnet50_imagefolder.json).
file(CREATE_LINK ${folder}/test ${folder}/val SYMBOLIC)
file(GLOB_RECURSE recipes ${CONFIGS}/*.json)
set(count 0)
set(plain "")
foreach(r ${recipes})
  if(r MATCHES "/_base_/")
    continue()
  endif()
  if(r MATCHES "/sweeps/")  # sweep files: every point validates (isp sweep --validate)
    execute_process(COMMAND ${ISP} sweep ${r} --validate RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  elseif(r MATCHES "resnet50_imagefolder")  # 1000 ImageNet classes; the tiny folder has 10
    execute_process(COMMAND ${ISP} validate ${r} --set nodes.backbone.num_classes=10
      RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  else()
    list(APPEND plain ${r})  # validated together below, in one start
    set(rc 0)
  endif()
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "isp validate ${r} failed (${rc}): ${out}${err}")
  endif()
  math(EXPR count "${count} + 1")
endforeach()
list(LENGTH plain n_plain)
if(count EQUAL 0 OR n_plain LESS 10)
  message(FATAL_ERROR "too few recipes found under ${CONFIGS}: ${count} in all, ${n_plain} plain")
endif()
execute_process(COMMAND ${ISP} validate ${plain} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "isp validate of ${n_plain} recipes failed (${rc}): ${out}${err}")
endif()
# One OK line per recipe: none was skipped.
string(REGEX MATCHALL "\\.json: OK " oks "${out}")
list(LENGTH oks n_ok)
if(NOT n_ok EQUAL n_plain)
  message(FATAL_ERROR "isp validate of ${n_plain} recipes printed ${n_ok} OK lines: ${out}${err}")
endif()
# Several recipes, one bad: the others are still checked, the bad one is named with its file, the status is 2.
set(bad_recipe ${CMAKE_CURRENT_BINARY_DIR}/validate_bad.json)
file(WRITE ${bad_recipe}
  "{\"_base_\": [\"${CONFIGS}/classifier/quick_fmnist.json\"], \"nodes\": {\"backbone\": {\"depth\": 57}}}")
execute_process(COMMAND ${ISP} validate ${bad_recipe} ${CONFIGS}/classifier/quick_fmnist.json
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 2 OR NOT err MATCHES "error: ${bad_recipe}: .*/nodes/backbone/depth: expected one of"
   OR NOT out MATCHES "classifier/quick_fmnist.json: OK")
  message(FATAL_ERROR "isp validate of a bad and a good recipe: status ${rc}, output: ${out}${err}")
endif()
# A value the dataset itself rejects (a root without Fashion-MNIST) is reported where it was set: at
# /nodes/data/root in the overriding recipe, not at the base file's /nodes/data. In a batch, a value set by --set
# is reported at the --set, after the recipe's name.
set(root_recipe ${CMAKE_CURRENT_BINARY_DIR}/validate_root.json)
file(WRITE ${root_recipe}
  "{\"_base_\": [\"${CONFIGS}/classifier/quick_fmnist.json\"], \"nodes\": {\"data\": {\"root\": \"/nonexistent/fmnist\"}}}")
execute_process(COMMAND ${ISP} validate ${root_recipe} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 2 OR NOT err MATCHES "error: ${root_recipe}: /nodes/data/root: /nonexistent/fmnist: missing train-images")
  message(FATAL_ERROR "isp validate with a missing dataset root: status ${rc}, output: ${out}${err}")
endif()
execute_process(COMMAND ${ISP} validate ${bad_recipe} ${CONFIGS}/classifier/quick_fmnist.json
  --set nodes.data.root=/nonexistent/fmnist RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 2
   OR NOT err MATCHES "error: ${bad_recipe}: .*/nodes/backbone/depth: expected one of"
   OR NOT err MATCHES "error: [^\n]*classifier/quick_fmnist.json: --set nodes.data.root=/nonexistent/fmnist: /nodes/data/root: ")
  message(FATAL_ERROR "isp validate of two recipes with a bad --set: status ${rc}, output: ${out}${err}")
endif()
# The schedule fragment bench/compare_pruners.sh layers over the pruning recipes.
if(TRUE)
  set(layered "")
  foreach(base resnet56_fmnist resnet56_fmnist_l1norm resnet56_fmnist_flops_only resnet56_fmnist_random)
    set(tmp ${CMAKE_CURRENT_BINARY_DIR}/bench_${base}.json)
    file(WRITE ${tmp} "{\"_base_\": [\"${CONFIGS}/isp/${base}.json\", \"${CONFIGS}/_base_/schedules/isp_cpu_short.json\"]}")
    list(APPEND layered ${tmp})
  endforeach()
  execute_process(COMMAND ${ISP} validate ${layered} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "isp validate ${layered} failed (${rc}): ${out}${err}")
  endif()
endif()
# A bad value is an error naming the recipe file and the JSON path.
execute_process(COMMAND ${ISP} validate ${CONFIGS}/classifier/quick_fmnist.json --set nodes.backbone.depth=57
  RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_VARIABLE out)
if(rc EQUAL 0)
  message(FATAL_ERROR "validate accepted depth 57")
endif()
if(NOT err MATCHES "/nodes/backbone/depth: expected one of 20,32,44,56,110, got 57")
  message(FATAL_ERROR "unexpected error text: ${err}")
endif()
# --print-resolved: the resolved recipe as JSON on stdout (bases merged, --set applied, components named), the OK
# line on stderr.
execute_process(COMMAND ${ISP} validate ${CONFIGS}/isp/quick_fmnist.json --print-resolved
  --set nodes.prune.channel_multiple=8 RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "validate --print-resolved failed (${rc}): ${err}")
endif()
if(NOT err MATCHES "quick_fmnist.json: OK")
  message(FATAL_ERROR "validate --print-resolved: no OK line on stderr: ${err}")
endif()
string(JSON multiple GET "${out}" nodes prune channel_multiple)
string(JSON batch GET "${out}" nodes prune batch_size)
string(JSON budget GET "${out}" nodes flops_budget target)
string(JSON prune_type GET "${out}" components /nodes/prune type)
if(NOT multiple EQUAL 8 OR NOT batch EQUAL 50 OR NOT budget EQUAL 0.55 OR NOT prune_type STREQUAL "isp::PruneChannels")
  message(FATAL_ERROR "validate --print-resolved: unexpected values ${multiple} ${batch} ${budget} ${prune_type}")
endif()
# --print-data-sizes: every dataset node loaded, its split sizes and classes as JSON on stdout. The quick recipe
# takes stratified subsets of Fashion-MNIST (train_subset 4000, val_subset 500, test_subset 1000; 10 classes).
execute_process(COMMAND ${ISP} validate ${CONFIGS}/isp/quick_fmnist.json --print-data-sizes
  RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "validate --print-data-sizes failed (${rc}): ${err}")
endif()
string(JSON train GET "${out}" data train)
string(JSON val GET "${out}" data val)
string(JSON test GET "${out}" data test)
string(JSON classes GET "${out}" data classes)
string(JSON datasets LENGTH "${out}")
if(NOT train EQUAL 4000 OR NOT val EQUAL 500 OR NOT test EQUAL 1000 OR NOT classes EQUAL 10 OR NOT datasets EQUAL 1)
  message(FATAL_ERROR "validate --print-data-sizes: unexpected sizes ${train} ${val} ${test} ${classes} (${datasets} datasets)")
endif()
execute_process(COMMAND ${ISP} validate ${CONFIGS}/isp/quick_fmnist.json --print-data-sizes --print-resolved
  RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_VARIABLE out)
# Refused by run_recipe itself (so library callers of RunOptions get the same error), not only by the CLI.
if(rc EQUAL 0 OR NOT err MATCHES "--print-resolved and --print-data-sizes: choose one")
  message(FATAL_ERROR "validate with both --print-data-sizes and --print-resolved was not refused (${rc}): ${err}")
endif()
message(STATUS "validated ${count} recipes")
