# Compiles the sources of one CMake target with the exact commands the build uses (compile_commands.json), without
# running the build tool: several such tests then run at once, where `cmake --build --target` in one build tree had to
# take turns (two make processes may rewrite the same dependency files). The precompiled header they reuse exists
# already: ctest runs after the build.
#   -DDB=compile_commands.json -DTARGET=name [-DEXPECT_ERROR=regex] [-DLAUNCHER=ccache] -P compile_target.cmake
# (compile_commands.json leaves out the compiler launcher: LAUNCHER puts it back, so ccache keeps what compiles.)
# With EXPECT_ERROR the compile must fail and print text matching it (a compile-time misuse check); without it, every
# source must compile.
cmake_minimum_required(VERSION 3.20)
foreach(var DB TARGET)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "compile_target.cmake: -D${var}=... is missing")
  endif()
endforeach()
string(REGEX REPLACE "([][+.*()^$?|\\])" "\\\\\\1" target_pattern "${TARGET}")
file(READ "${DB}" db)
string(JSON count LENGTH "${db}")
set(found 0)
math(EXPR last "${count} - 1")
foreach(i RANGE ${last})
  string(JSON command GET "${db}" ${i} command)
  # The object this command writes (-o), in the target's own folder: the -include of a precompiled header names
  # the folder of the target that made it, which is not the target compiled.
  if(NOT command MATCHES "-o [^ ]*CMakeFiles/${target_pattern}\\.dir/")
    continue()
  endif()
  math(EXPR found "${found} + 1")
  string(JSON directory GET "${db}" ${i} directory)
  string(JSON file GET "${db}" ${i} file)
  if(LAUNCHER)
    list(JOIN LAUNCHER " " launcher)
    set(command "${launcher} ${command}")
  endif()
  execute_process(COMMAND sh -c "${command}" WORKING_DIRECTORY "${directory}" RESULT_VARIABLE status
                  OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message("${out}")
  if(DEFINED EXPECT_ERROR)
    if(status EQUAL 0)
      message(FATAL_ERROR "${file} compiled, but it must not: the misuse it holds went unnoticed")
    endif()
    if(NOT out MATCHES "${EXPECT_ERROR}")
      message(FATAL_ERROR "${file} failed to compile, but without the expected message: ${EXPECT_ERROR}")
    endif()
  elseif(NOT status EQUAL 0)
    message(FATAL_ERROR "${file} failed to compile (exit ${status})")
  endif()
endforeach()
if(found EQUAL 0)
  message(FATAL_ERROR "${DB} has no source of the target ${TARGET}")
endif()
message("${TARGET}: ${found} source(s) checked")
