//! Sample disks for tests, benchmarks and the quickstart. (Under construction.)
