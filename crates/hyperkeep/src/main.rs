fn main() {
    println!("hyperkeep: under construction");
}
