# The dependencies of accelerated::accelerated, found the same way by the build tree and the installed package.
include(CMakeFindDependencyMacro)
find_dependency(Torch)
find_dependency(Boost)
find_dependency(range-v3)
find_dependency(ZLIB)
if(NOT TARGET Boost::headers AND TARGET Boost::boost)
  add_library(Boost::headers ALIAS Boost::boost)
endif()
