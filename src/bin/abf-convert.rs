fn main() -> std::process::ExitCode {
    abf::cli::convert::main()
}
