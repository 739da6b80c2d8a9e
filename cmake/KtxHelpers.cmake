# Terse build helpers (after Abseil's absl_cc_library / absl_cc_test).
#
#   ktx_cc_library(NAME n SRCS a.cc ... [HDRS ...] [DEPS ...] [COPTS ...] [TYPE STATIC|SHARED])
#   ktx_cc_test(NAME n SRCS a_test.cc ... [DEPS ...] [LABELS ...] [TIMEOUT s] [SANITIZE])
#     SANITIZE: also run it under ASan+UBSan in the test command (label "sanitize",
#     built by the `sanitize_tests` target of a -DKTX_SANITIZE=ON -DKTX_MINIMAL=ON tree).
#   ktx_cc_binary(NAME n SRCS main.cc ... [DEPS ...] [OUTPUT_NAME name])
#
# Every target sees the repository root as include root, so includes read
# "runtime/gguf/gguf_reader.h". Warnings are errors on ktx's own code.

set(KTX_WARNINGS -Wall -Wextra -Wpedantic -Wno-unused-parameter -Wno-missing-field-initializers)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  # GCC 12 reports false -Wrestrict / -Wstringop-overflow inside libstdc++ at -O3.
  list(APPEND KTX_WARNINGS -Wno-restrict -Wno-stringop-overflow)
endif()
if(KTX_WERROR)
  list(APPEND KTX_WARNINGS -Werror)
endif()

function(_ktx_common target)
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR}/proto_gen)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${KTX_WARNINGS}>)
endfunction()

function(ktx_cc_library)
  cmake_parse_arguments(K "" "NAME;TYPE" "SRCS;HDRS;DEPS;COPTS" ${ARGN})
  if(NOT K_TYPE)
    set(K_TYPE STATIC)
  endif()
  add_library(${K_NAME} ${K_TYPE} ${K_SRCS} ${K_HDRS})
  _ktx_common(${K_NAME})
  target_link_libraries(${K_NAME} PUBLIC ${K_DEPS})
  if(K_COPTS)
    target_compile_options(${K_NAME} PRIVATE ${K_COPTS})
  endif()
endfunction()

function(ktx_cc_binary)
  cmake_parse_arguments(K "" "NAME;OUTPUT_NAME" "SRCS;DEPS;COPTS" ${ARGN})
  add_executable(${K_NAME} ${K_SRCS})
  _ktx_common(${K_NAME})
  target_link_libraries(${K_NAME} PRIVATE ${K_DEPS})
  if(K_OUTPUT_NAME)
    set_target_properties(${K_NAME} PROPERTIES OUTPUT_NAME ${K_OUTPUT_NAME})
  endif()
  if(K_COPTS)
    target_compile_options(${K_NAME} PRIVATE ${K_COPTS})
  endif()
endfunction()

function(ktx_cc_test)
  cmake_parse_arguments(K "SANITIZE" "NAME;TIMEOUT" "SRCS;DEPS;LABELS;COPTS" ${ARGN})
  add_executable(${K_NAME} ${K_SRCS})
  if(K_SANITIZE)
    list(APPEND K_LABELS sanitize)
    set_property(GLOBAL APPEND PROPERTY KTX_SANITIZE_TESTS ${K_NAME})
  endif()
  _ktx_common(${K_NAME})
  target_link_libraries(${K_NAME} PRIVATE ${K_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
  target_compile_definitions(${K_NAME} PRIVATE KTX_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  if(K_COPTS)
    target_compile_options(${K_NAME} PRIVATE ${K_COPTS})
  endif()
  if(NOT K_TIMEOUT)
    set(K_TIMEOUT 300)
  endif()
  # Listing a test's cases runs the binary at ctest time; CMake's default of 5 s
  # for it failed once on a loaded 2-core CI machine (cuda_kernels_test, whose
  # start loads the CUDA libraries), which fails the whole ctest run.
  gtest_discover_tests(${K_NAME} DISCOVERY_MODE PRE_TEST DISCOVERY_TIMEOUT 120
    PROPERTIES TIMEOUT ${K_TIMEOUT} LABELS "${K_LABELS}"
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
endfunction()
