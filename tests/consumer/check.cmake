# Builds and runs the consumer project against this source tree, either installed (find_package) or vendored
# (add_subdirectory), in a fresh folder each time.
set(dir ${WORK_DIR}/${MODE})
file(REMOVE_RECURSE ${dir})
file(MAKE_DIRECTORY ${dir})
set(launcher)
find_program(CCACHE ccache)
if(CCACHE)
  set(launcher -DCMAKE_CXX_COMPILER_LAUNCHER=${CCACHE})
endif()
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT code EQUAL 0)
    message(FATAL_ERROR "failed (${code}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${dir}/lib-build -DCMAKE_CXX_COMPILER=${CXX} -DACCELERATED_BUILD_TESTS=OFF
      -DACCELERATED_BUILD_EXAMPLES=OFF -DACCELERATED_BUILD_BENCH=OFF -DCMAKE_INSTALL_PREFIX=${dir}/prefix)
  run(${CMAKE_COMMAND} --install ${dir}/lib-build)
  run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR} -B ${dir}/build -DCMAKE_CXX_COMPILER=${CXX} ${launcher}
      -DCONSUMER_MODE=find_package -DCMAKE_PREFIX_PATH=${dir}/prefix)
else()
  run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR} -B ${dir}/build -DCMAKE_CXX_COMPILER=${CXX} ${launcher}
      -DCONSUMER_MODE=add_subdirectory -DACCELERATED_SOURCE_DIR=${SOURCE_DIR})
endif()
run(${CMAKE_COMMAND} --build ${dir}/build)
run(${dir}/build/consumer)
