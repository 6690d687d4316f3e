//! VHDX (MS-VHDX) reader and writer. (Under construction.)
