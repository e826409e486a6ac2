# cmake --install exports accelerated::accelerated, so that find_package(accelerated) works.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/accelerated DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS accelerated EXPORT acceleratedTargets)
set(_config_dir ${CMAKE_INSTALL_LIBDIR}/cmake/accelerated)
install(EXPORT acceleratedTargets NAMESPACE accelerated:: DESTINATION ${_config_dir})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/acceleratedConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/acceleratedConfig.cmake INSTALL_DESTINATION ${_config_dir})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/acceleratedConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/acceleratedConfig.cmake ${PROJECT_BINARY_DIR}/acceleratedConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/acceleratedDependencies.cmake DESTINATION ${_config_dir})
