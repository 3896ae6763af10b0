fn main() -> std::process::ExitCode {
    abf::cli::verify::main()
}
