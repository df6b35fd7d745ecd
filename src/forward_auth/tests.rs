use super::answer::ascii_json;
use super::*;

#[test]
fn the_route_policy_comes_from_the_query_needs_a_surface_and_refuses_a_repeated_key() {
    let policy = route_policy(Some("surface=public_api&scopes=messages%3Asend,a&cost=2")).unwrap();
    assert_eq!(policy["surface"], "public_api");
    assert_eq!(policy["scopes"], "messages:send,a");
    assert_eq!(policy["cost"], "2");
    for missing in [None, Some(""), Some("scopes=a")] {
        let Err(Error::InvalidArgument(v)) = route_policy(missing) else {
            panic!("{missing:?}: a policy without a surface was accepted");
        };
        assert_eq!(v.0[0].field, "query.surface");
    }
    let Err(Error::InvalidArgument(v)) = route_policy(Some("surface=a&surface=public_api")) else {
        panic!("a repeated key was accepted");
    };
    assert_eq!(v.0[0].field, "query.surface");
}

#[test]
fn the_original_request_is_read_per_gateway_and_the_gateway_secret_is_not_passed_on() {
    let request = Request::builder()
        .uri("/auth/nginx")
        .header("X-Original-Method", "POST")
        .header("X-Original-URI", "/api/v1/messages/send?x=1")
        .header("X-Forwarded-Uri", "/elsewhere")
        .header("host", "api.example.test")
        .header("x-api-key", "first")
        .header("x-api-key", "second")
        .header(GATEWAY_SECRET_HEADER, "s3cret-s3cret-s3cret")
        .body(())
        .unwrap();
    let http = http_request(Gateway::Nginx, &request);
    assert_eq!(http.method, "POST");
    assert_eq!(http.path, "/api/v1/messages/send?x=1");
    assert_eq!(http.host, "api.example.test");
    // Two credentials are one ambiguous value, as Envoy hands them over.
    assert_eq!(http.headers["x-api-key"], "first,second");
    assert!(!http.headers.contains_key(GATEWAY_SECRET_HEADER));

    let request = Request::builder()
        .header("X-Forwarded-Method", "DELETE")
        .header("X-Forwarded-Uri", "/api/v1/keys/1")
        .header("X-Forwarded-Host", "api.example.test")
        .body(())
        .unwrap();
    let http = http_request(Gateway::Traefik, &request);
    assert_eq!(
        (http.method.as_str(), http.path.as_str(), http.host.as_str()),
        ("DELETE", "/api/v1/keys/1", "api.example.test")
    );
}

#[test]
fn a_denial_body_fits_one_ascii_header_value_with_the_same_json_meaning() {
    let body = "{\n  \"error\": \"Clé invalide 🔑\",\n  \"status\": 401\n}";
    let line = ascii_json(body);
    assert!(line.bytes().all(|b| (0x20..0x7f).contains(&b)), "{line}");
    assert!(hyper::header::HeaderValue::from_str(&line).is_ok());
    let back: serde_json::Value = serde_json::from_str(&line).unwrap();
    let original: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(back, original);
}
