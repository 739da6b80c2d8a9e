# Runs `ktx-ctl tokenize` on the fixture model and checks the ids against
# tests/data/tokenizer_cases.json (llama.cpp), with and without --no-special,
# and the --pieces output.
set(model ${SOURCE_DIR}/tests/data/dsv3-tiny-q8_0.gguf)

function(expect_output expected)
  execute_process(COMMAND ${KTX_CTL} tokenize --model ${model} ${ARGN}
    OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "ktx-ctl tokenize ${ARGN} exited ${rc}: ${err}")
  endif()
  if(NOT out STREQUAL expected)
    message(FATAL_ERROR "ktx-ctl tokenize ${ARGN}:\n got: '${out}'\n expected: '${expected}'")
  endif()
endfunction()

# Case "plain" and "pad_token_text" of tokenizer_cases.json.
expect_output("0,75,409,392,337,393\n" "Hello world")
expect_output("0,2\n" "<｜▁pad▁｜>")
expect_output("0,63,242,192,159,229,153,132,115,397,229,153,132,242,192,159,65\n"
  --no-special "<｜▁pad▁｜>")
expect_output("75,409,392,337,393\n" --no-bos "Hello world")
expect_output("0,75\n0\t<｜begin▁of▁sentence｜>\n75\tH\n" --pieces "H")
expect_output("35,13\n35\t \n13\t\\n\n" --no-bos --pieces " \n")

execute_process(COMMAND ${KTX_CTL} tokenize --model /nonexistent.gguf "x"
  ERROR_VARIABLE err RESULT_VARIABLE rc)
if(rc EQUAL 0 OR NOT err MATCHES "nonexistent.gguf")
  message(FATAL_ERROR "a missing model must fail naming the file; rc=${rc} err=${err}")
endif()
