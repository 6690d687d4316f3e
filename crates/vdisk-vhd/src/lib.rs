//! VHD reader and writer. (Under construction.)
