# ktx-ctl topology init / validate / plan end to end, on a fake two-socket
# machine (data/two-socket-h100.json) and the tiny DeepSeek fixture.
# Variables: KTX_CTL (the binary), SRC (repository root), WORK (scratch folder).
set(H ${SRC}/tests/topology/data/two-socket-h100.json)
set(MODEL ${SRC}/tests/data/dsv3-tiny-q4_k_m.gguf)
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})

function(run expect_rc)
  execute_process(COMMAND ${KTX_CTL} ${ARGN} OUTPUT_VARIABLE out ERROR_VARIABLE err
                  RESULT_VARIABLE rc)
  if(NOT rc EQUAL expect_rc)
    message(FATAL_ERROR "ktx-ctl ${ARGN}: exit ${rc}, expected ${expect_rc}\nstdout:\n${out}\nstderr:\n${err}")
  endif()
  set(out "${out}" PARENT_SCOPE)
  set(err "${err}" PARENT_SCOPE)
endfunction()

function(expect_match text regex)
  if(NOT "${text}" MATCHES "${regex}")
    message(FATAL_ERROR "expected /${regex}/ in:\n${text}")
  endif()
endfunction()

# init writes a config that validates on the same machine; a second init refuses to overwrite.
run(0 topology init --hardware ${H} --listen 127.0.0.1:6000 --out ${WORK}/init.textproto)
run(0 topology validate ${WORK}/init.textproto --hardware ${H} --model ${MODEL})
expect_match("${out}" "OK, 1 node, 2 shards")
run(1 topology init --hardware ${H} --out ${WORK}/init.textproto)
expect_match("${err}" "exists; pass --force")
run(0 topology init --hardware ${H})
expect_match("${out}" "cpus: \"16-31,48-63\"")
expect_match("${out}" "attention_device: \"cuda:0\"")
run(1 topology init --hardware ${H} --listen 127.0.0.1:0)
expect_match("${err}" "<init>:[0-9]+: node 'node0': listen address")

# The example configs are valid on the two-socket machine.
foreach(config single-process two-sockets one-node-per-socket two-hosts)
  run(0 topology validate ${SRC}/configs/${config}.textproto --hardware ${H} --model ${MODEL})
endforeach()

# Every problem, each with its line; parse errors with line and column.
run(1 topology validate ${SRC}/tests/topology/data/bad.textproto --hardware ${H})
foreach(line_and_text
    "4: node 'head': listen address '127.0.0.1:99999'"
    "10: shard 'a': cpu list '0-7,4': cpu 4 is listed twice"
    "14: node name 'head' is used twice \\(line 3\\)"
    "16: node 'head' is a second head"
    "19: shard name 'a' is used twice \\(line 8\\)"
    "20: shard 'a': NUMA node 3 does not exist")
  expect_match("${err}" "bad.textproto:${line_and_text}")
endforeach()
expect_match("${err}" "bad.textproto: 6 problems")
run(1 topology validate ${SRC}/tests/topology/data/syntax-error.textproto --hardware ${H})
expect_match("${err}" "syntax-error.textproto:3:9: Message type \"ktx.v1.NodeConfig\" has no field named \"shard\"")

# A model that does not fit: 1 MiB budgets.
file(READ ${SRC}/configs/two-sockets.textproto text)
string(REPLACE "246960619520" "1048576" text "${text}")
file(WRITE ${WORK}/small.textproto "${text}")
run(1 topology validate ${WORK}/small.textproto --hardware ${H} --model ${MODEL})
expect_match("${err}" "small.textproto:18: shard 'node0/numa0': the expert plan puts 1.82 MiB \\(16 experts\\) on it but its budget is 1.00 MiB")
expect_match("${err}" "small.textproto:24: shard 'node0/numa1'")
run(1 topology plan --model ${MODEL} --topology ${WORK}/small.textproto --hardware ${H})
expect_match("${out}" "DOES NOT FIT")
expect_match("${err}" "missing 836.00 KiB")

# The plan, as JSON.
run(0 topology plan --model ${MODEL} --topology ${SRC}/configs/two-sockets.textproto --hardware ${H} --json)
string(JSON fits GET "${out}" fits)
string(JSON n_shards LENGTH "${out}" shards)
string(JSON n0 GET "${out}" shards 0 n_experts)
string(JSON r1 GET "${out}" shards 1 layers 1 ranges)
if(NOT fits OR NOT n_shards EQUAL 2 OR NOT n0 EQUAL 16 OR NOT r1 STREQUAL "8-15")
  message(FATAL_ERROR "unexpected plan: fits=${fits} shards=${n_shards} n0=${n0} r1=${r1}\n${out}")
endif()

# With a profile and replication of the hottest expert of each layer.
run(0 topology plan --model ${MODEL} --topology ${SRC}/configs/one-node-per-socket.textproto
    --hardware ${H} --profile ${SRC}/tests/topology/data/tiny-profile.json --replicate-hot 1 --json)
string(JSON n_rep GET "${out}" n_replicated)
string(JSON c5 LENGTH "${out}" layers 0 shards_of_expert 5)
string(JSON c11 LENGTH "${out}" layers 1 shards_of_expert 11)
string(JSON c3 LENGTH "${out}" layers 1 shards_of_expert 3)
if(NOT n_rep EQUAL 2 OR NOT c5 EQUAL 2 OR NOT c11 EQUAL 2 OR NOT c3 EQUAL 1)
  message(FATAL_ERROR "unexpected replication: n_replicated=${n_rep} copies ${c5} ${c11} ${c3}\n${out}")
endif()
run(1 topology plan --model ${MODEL} --topology ${SRC}/configs/two-sockets.textproto
    --hardware ${H} --replicate-hot 1)
expect_match("${err}" "needs an expert-usage profile")
message(STATUS "ktx-ctl topology init/validate/plan: all checks passed")
