# ktx-ctl synth end to end: the dry-run table of the full DeepSeek-V3 Q4_K_M
# shape (totals and types from ../shared/notes/GGUF.md section 5), tiny models
# written with different thread counts (identical bytes) and seeds (different
# bytes), and a usage error.
function(run)
  execute_process(COMMAND ${KTX_CTL} ${ARGN} OUTPUT_VARIABLE out ERROR_VARIABLE err
                  RESULT_VARIABLE rc)
  set(out "${out}" PARENT_SCOPE)
  set(err "${err}" PARENT_SCOPE)
  set(rc "${rc}" PARENT_SCOPE)
endfunction()

run(synth --preset dsv3 --quant q4_k_m --dry-run)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "synth --dry-run exited ${rc}: ${err}")
endif()
foreach(expected "tensors: 1086" "385750.62 MiB" "376.7 GiB")
  string(FIND "${out}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "dry-run output lacks '${expected}':\n${out}")
  endif()
endforeach()
foreach(pattern "blk\\.0\\.attn_k_b\\.weight +q5_0" "blk\\.9\\.ffn_down_exps\\.weight +q6_K"
        "blk\\.10\\.ffn_down_exps\\.weight +q4_K" "output\\.weight +q6_K"
        "blk\\.3\\.ffn_gate_inp\\.weight +f32")
  if(NOT out MATCHES "${pattern}")
    message(FATAL_ERROR "dry-run output does not match '${pattern}'")
  endif()
endforeach()

set(dir "${WORK_DIR}/synth_cli_test")
file(REMOVE_RECURSE "${dir}")
file(MAKE_DIRECTORY "${dir}")
foreach(case "1;5" "2;5" "0;6")
  list(GET case 0 threads)
  list(GET case 1 seed)
  run(synth --preset tiny --quant q4_k_m --seed ${seed} --threads ${threads}
      --out "${dir}/t${threads}_s${seed}.gguf")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "synth --preset tiny exited ${rc}: ${err}")
  endif()
endforeach()
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files "${dir}/t1_s5.gguf" "${dir}/t2_s5.gguf"
                RESULT_VARIABLE same)
if(NOT same EQUAL 0)
  message(FATAL_ERROR "same seed, different thread counts: files differ")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files "${dir}/t1_s5.gguf" "${dir}/t0_s6.gguf"
                RESULT_VARIABLE same)
if(same EQUAL 0)
  message(FATAL_ERROR "different seeds gave identical files")
endif()
file(REMOVE_RECURSE "${dir}")

run(synth --preset tiny)
if(rc EQUAL 0 OR NOT err MATCHES "--out")
  message(FATAL_ERROR "synth without --out should fail naming --out; rc ${rc}: ${err}")
endif()
message(STATUS "synth: dry-run table, determinism and usage error OK")
