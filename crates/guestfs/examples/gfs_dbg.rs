fn main() {
    let a: Vec<String> = std::env::args().collect();
    let v = guestfs::volume::Volume::from_bytes(std::fs::read(&a[1]).unwrap());
    let fs = guestfs::open_fs(v).unwrap();
    for e in fs.read_dir(fs.root()).unwrap() {
        println!(
            "{:?} {:?}",
            e,
            fs.metadata(e.node).map(|m| (m.file_type, m.mode, m.size))
        );
    }
}
