fn main() { eprintln!("oops"); }
