# The dependencies of accelerated::accelerated, found the same way by the build tree and the installed package.
include(CMakeFindDependencyMacro)
find_dependency(Torch)
find_dependency(Boost)
find_dependency(range-v3)
find_dependency(ZLIB)
if(NOT TARGET Boost::headers AND TARGET Boost::boost)
  add_library(Boost::headers ALIAS Boost::boost)
endif()

# c10d's reducer.hpp includes torch/csrc/distributed/autograd/context/context.h, which some LibTorch packages omit
# (Debian's 1.13 among them): point the compiler at a stand-in when the real one is missing.
set(ACCELERATED_NEED_DIST_AUTOGRAD_SHIM OFF)
find_file(ACCELERATED_DIST_AUTOGRAD_CONTEXT torch/csrc/distributed/autograd/context/context.h
          PATHS ${TORCH_INCLUDE_DIRS} NO_DEFAULT_PATH)
if(NOT ACCELERATED_DIST_AUTOGRAD_CONTEXT)
  set(ACCELERATED_NEED_DIST_AUTOGRAD_SHIM ON)
endif()
