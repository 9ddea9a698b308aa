fn main() {
    ferrotune_build::plugin();
}
